"""Training a CT-GAN injector or remover: ``model.fit`` on the suite's training contract.

The step (least squares GAN + L1, one generator pass updating both networks) is
:class:`ct_gan_augment.gan.InpaintingGAN`'s ``train_step``; everything around it is
:mod:`lungct.training`'s: ``BackupAndRestore``, epoch checkpoints, ``CSVLogger``, TensorBoard,
the run's time budget, the device strategy.

**Epochs.** An epoch is ``checkpoint_every`` steps: the plan's ``steps`` are rounded up to
whole epochs (a plan with fewer steps than ``checkpoint_every`` trains one epoch of all its
steps, and a new folder's ``plan.json`` records ``checkpoint_every`` lowered to ``steps``).
Batch ``i`` of epoch ``e`` is drawn from ``(seed, e, i)`` alone, so a resumed run trains on the
batches an uninterrupted one would have.

Model folder (``GAN_DIR``)::

    plan.json, manifest.json       the plan; kind, folds, series, steps done, last losses
                                   (sealed when training ends: the folder's done marker,
                                   :mod:`lungct.modeldir`)
    normaliser.npz / .json         histogram equalisation + normalisation (no pickle)
    generator.keras                the in-painting U-Net, refreshed (atomically) after every
    discriminator.keras            epoch, so a model is usable while it trains, with
                                   ``--allow-unfinished``
    grids/step_NNNNNN.png          condition | generated | real after NNNNNN steps, at the end
                                   of the epochs that pass a multiple of ``grid_every`` and
                                   at the end of each run
    checkpoints/epoch_NNN.keras    both networks and both optimisers after epoch NNN (the
                                   newest ``keep_checkpoints`` kept)
    checkpoints/backup/            the state ``--resume`` continues from
    logs/train_log.csv             one row per epoch: the epoch's mean d_loss, g_loss, g_adv,
                                   g_l1, d_acc, d_acc_real, d_acc_fake; seconds, steps,
                                   train_samples_per_s (epochs counted from 0)
    logs/train/                    TensorBoard event files

**Time budget and resume.** ``max_minutes`` is the budget of this run: once it is spent the
run stops after the batch under way, ends its epoch (which counts as done with the steps it
ran) and seals the folder. ``resume`` continues to the plan's last epoch: after a ``kill -9``
from the epoch under way, after a budget from where it stopped. A resumed run takes the seal
away until it ends again.

**Folders of the former loop** (``checkpoints/step_NNNNNN/`` with ``state.json``, the log in
``train_log.csv``) resume too: the newest step checkpoint's weights and optimiser variables
are loaded and training goes on at the epoch its step count completes (``step //
checkpoint_every``), on the new layout; the old files are left as they were.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ct_gan_augment.config import GANPlan
from ct_gan_augment.data import TrainingCubes
from ct_gan_augment.gan import METRICS, InpaintingGAN
from ct_gan_augment.grid import save_grid
from ct_gan_augment.inject import generated_to_hu, make_condition, run_generator
from ct_gan_augment.manifest import ModelManifest, format_folds, library_versions
from ct_gan_augment.model import DISCRIMINATOR_FILE, GENERATOR_FILE, NORMALISER_FILE, PLAN_FILE
from ct_gan_augment.normaliser import CubeNormaliser
from lungct.errors import LungCTError
from lungct.modeldir import MANIFEST_NAME, describe_plan_changes, seal_model_dir
from lungct.training import (
    BACKUP,
    CHECKPOINTS,
    fit_callbacks,
    fit_epochs,
    from_chief,
    is_chief,
    log_float,
    make_strategy,
    prepare_model,
    read_log,
    replicas,
    restored_epoch,
    save_model_atomic,
    strategy_scope,
    task_name,
    worker_count,
    worker_dir,
)

GRIDS = "grids"
GRID_ROWS = 4
LEGACY_LOG = "train_log.csv"
"""The former loop's log (one row every ``log_every`` steps), left in folders it wrote."""


def require_tensorflow() -> None:
    """Training uses a TensorFlow ``GradientTape`` step; say so clearly on another backend."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise LungCTError(
            None,
            f"CT-GAN training needs the TensorFlow backend (KERAS_BACKEND is {backend!r}); "
            "run with KERAS_BACKEND=tensorflow (inference works on any backend)",
        )


# --- epochs ---------------------------------------------------------------------------------


def fitted_plan(plan: GANPlan) -> GANPlan:
    """The plan as a new folder trains it: ``checkpoint_every`` lowered to ``steps`` when the
    plan has fewer steps than one epoch."""
    if 0 < plan.steps < plan.checkpoint_every:
        return plan.replace(checkpoint_every=plan.steps)
    return plan


def plan_epochs(plan: GANPlan) -> int:
    """Epochs of ``checkpoint_every`` steps the plan's ``steps`` round up to."""
    return math.ceil(plan.steps / plan.checkpoint_every)


def _logged_epochs(model_dir: Path) -> dict[int, dict[str, str]]:
    """The log's last row of every epoch (an epoch cut short by a kill is logged again when
    the resumed run repeats it)."""
    rows: dict[int, dict[str, str]] = {}
    for row in read_log(model_dir):
        epoch = log_float(row, "epoch")
        if not math.isnan(epoch):
            rows[int(epoch)] = row
    return rows


def steps_done(model_dir: Path, plan: GANPlan, epochs: int) -> int:
    """Training steps of the first ``epochs`` epochs: those the log counted (a run stopped by
    its budget ends its epoch early), whole epochs for those it has no row of (trained by the
    former loop)."""
    rows = _logged_epochs(model_dir)
    total = 0
    for epoch in range(epochs):
        steps = log_float(rows[epoch], "steps") if epoch in rows else math.nan
        total += plan.checkpoint_every if math.isnan(steps) else int(steps)
    return total


# --- batches --------------------------------------------------------------------------------


class GANBatches(keras.utils.PyDataset):
    """One epoch of training batches, ``(condition, real)``: batch ``i`` of epoch ``e`` is
    ``plan.batch_size`` augmented cubes drawn from ``(plan.seed, e, i)`` alone, whoever cuts it
    and whenever (the epoch is set by :func:`lungct.training.fit_callbacks` as it begins).

    Args:
        cubes: the training cubes.
        normaliser: fitted on them.
        plan: batch size, cube and hole size, seed.
        sized: whether the condition has the size channel.
        epoch: the first epoch this dataset serves.
    """

    def __init__(
        self,
        cubes: TrainingCubes,
        normaliser: CubeNormaliser,
        plan: GANPlan,
        sized: bool,
        epoch: int = 0,
    ) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        self.cubes, self.normaliser, self.plan, self.sized = cubes, normaliser, plan, sized
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.plan.checkpoint_every

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``index`` of ``epoch``: the condition ``(B, c, c, c, C)`` and the normalised
        real cubes ``(B, c, c, c, 1)``, float32."""
        rng = np.random.default_rng([self.plan.seed, int(epoch), int(index)])
        cubes, diameters, centres = self.cubes.sample_sized(rng, self.plan.batch_size)
        real = self.normaliser.transform(cubes).astype(np.float32)
        sizes = (diameters, centres) if self.sized else (None, None)
        return make_condition(real, self.plan, *sizes), real[..., None]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.batch(self.epoch, index)

    def set_epoch(self, epoch: int) -> None:
        """The epoch that begins (Keras also calls ``on_epoch_end`` once before the first
        epoch, so counting there would be one ahead)."""
        self.epoch = int(epoch)


# --- what an epoch leaves in the folder ------------------------------------------------------


class EpochLog(keras.callbacks.CSVLogger):
    """Keras' ``CSVLogger`` without the empty ``val_`` columns it adds to the log of a run
    that has no validation: the columns are the first epoch's keys."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.keys is None and logs:
            self.keys = sorted(logs)
        super().on_epoch_end(epoch, logs)


class EpochOutputs(keras.callbacks.Callback):
    """At the end of every epoch: ``generator.keras`` and ``discriminator.keras`` refreshed
    (atomically), the manifest's steps and last losses, and a grid PNG when the epoch passed
    a multiple of ``grid_every`` steps or ends the run.

    Args:
        model_dir: the model folder.
        plan: the plan trained.
        cubes: the training cubes (the grid's rows are fixed ones of them).
        normaliser: fitted on them.
        manifest: updated and saved (unsealed) at every epoch.
        epochs: the run's last epoch (counted from 1).
        steps_before: steps done before this run's first epoch.
    """

    def __init__(
        self,
        model_dir: Path,
        plan: GANPlan,
        cubes: TrainingCubes,
        normaliser: CubeNormaliser,
        manifest: ModelManifest,
        epochs: int,
        steps_before: int,
    ) -> None:
        super().__init__()
        self.model_dir, self.plan, self.cubes = Path(model_dir), plan, cubes
        self.normaliser, self.manifest, self.epochs = normaliser, manifest, epochs
        self.steps = steps_before
        self.sized = plan.condition_channels(manifest.kind) > 1
        n = len(cubes)
        self.grid_indices = sorted({int(i) for i in np.linspace(0, n - 1, min(GRID_ROWS, n))})
        self.last_grid: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        before = self.steps
        ran = logs.get("steps")
        self.steps += self.plan.checkpoint_every if ran is None else int(ran)
        gan = self.model
        save_model_atomic(gan.generator, self.model_dir / GENERATOR_FILE)
        save_model_atomic(gan.discriminator, self.model_dir / DISCRIMINATOR_FILE)
        last = epoch + 1 >= self.epochs or bool(gan.stop_training)
        if last or self.steps // self.plan.grid_every > before // self.plan.grid_every:
            self.write_grid(gan.generator)
        self.manifest.steps_done = self.steps
        self.manifest.train_seconds = round(
            self.manifest.train_seconds + float(logs.get("seconds", 0.0)), 1
        )
        self.manifest.final = {k: round(float(logs[k]), 5) for k in METRICS if k in logs}
        self.manifest.save(self.model_dir)

    def write_grid(self, generator: keras.Model) -> Path:
        """``grids/step_NNNNNN.png``: condition | generated | real for fixed training cubes."""
        real_hu = self.cubes.central(self.grid_indices)
        diameters = np.asarray(self.cubes.diameters())[self.grid_indices] if self.sized else None
        x = make_condition(self.normaliser.transform(real_hu), self.plan, diameters)
        generated = run_generator(generator, x)
        # As pasted: clipped, de-normalised, overflow and underflow fixed, despeckled.
        generated_hu = np.stack(
            [
                generated_to_hu(g, r, self.normaliser, self.plan)
                for g, r in zip(generated, real_hu, strict=True)
            ]
        )
        path = self.model_dir / GRIDS / f"step_{self.steps:06d}.png"
        save_grid(
            path,
            [self.normaliser.inverse(x[..., 0]), generated_hu, real_hu],
            ["condition", "generated", "real"],
            suptitle=f"{self.manifest.kind}, step {self.steps}",
        )
        self.last_grid = self.steps
        return path


# --- folders of the former loop --------------------------------------------------------------


def legacy_checkpoint(model_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/step_NNNNNN/`` of the former loop (one with
    ``state.json``), or None."""
    root = Path(model_dir) / CHECKPOINTS
    done = sorted(p.parent for p in root.glob("step_*/state.json"))
    return done[-1] if done else None


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "inner_optimizer", optimizer)


def _load_optimizer(optimizer: Any, path: Path) -> None:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = [data[f"v{i:04d}"] for i in range(len(data.files))]
    except (OSError, ValueError, KeyError) as exc:
        raise LungCTError(path, f"broken optimiser checkpoint ({exc})") from None
    variables = _inner(optimizer).variables
    if len(arrays) != len(variables):
        raise LungCTError(path, "optimiser checkpoint does not match the model (plan changed?)")
    for var, value in zip(variables, arrays, strict=True):
        if tuple(var.shape) != value.shape:
            raise LungCTError(path, f"optimiser variable {var.path} has another shape")
    for var, value in zip(variables, arrays, strict=True):
        var.assign(value)


def restore_legacy(gan: InpaintingGAN, checkpoint: Path, plan: GANPlan, model_dir: Path) -> int:
    """Load a former loop's step checkpoint (both networks' weights, both optimisers'
    variables) into ``gan``; return its step count.

    Raises:
        LungCTError: a broken checkpoint, or a plan edited since it was written.
    """
    try:
        state = json.loads((checkpoint / "state.json").read_text())
        step = int(state["step"])
        gan.generator.load_weights(checkpoint / "generator.weights.h5")
        gan.discriminator.load_weights(checkpoint / "discriminator.weights.h5")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LungCTError(checkpoint, f"broken checkpoint ({type(exc).__name__}: {exc})") from None
    trained = state.get("plan")
    if isinstance(trained, dict):  # the plan of the first sittings (only steps may change)
        changes = describe_plan_changes({**trained, "steps": 0}, {**plan.to_dict(), "steps": 0})
        if changes:
            raise LungCTError(
                model_dir / PLAN_FILE,
                f"edited since training started ({changes}): restore it to resume, or train "
                "a new folder",
            )
    _load_optimizer(gan.g_optimizer, checkpoint / "optimizer_g.npz")
    _load_optimizer(gan.d_optimizer, checkpoint / "optimizer_d.npz")
    return step


# --- training --------------------------------------------------------------------------------


def _prepare_folder(
    model_dir: Path,
    kind: str,
    folds: list[int],
    plan: GANPlan | None,
    steps: int | None,
    resume: bool,
) -> tuple[GANPlan, ModelManifest | None]:
    """The plan to train and, on resume, the folder's manifest (checked against the run)."""
    plan_path = model_dir / PLAN_FILE
    if not resume:
        if plan_path.exists() or (model_dir / MANIFEST_NAME).exists():
            raise LungCTError(model_dir, "already holds a model; use --resume or another --out")
        return fitted_plan((plan or GANPlan()).replace(steps=steps)), None
    if not plan_path.is_file():
        raise LungCTError(model_dir, "nothing to resume (no plan.json); train without --resume")
    saved = GANPlan.load(plan_path)
    if plan is not None and fitted_plan(plan.replace(steps=saved.steps)) != saved:
        raise LungCTError(
            model_dir, "a resumed run keeps its plan.json; drop the plan options or use --steps"
        )
    manifest = ModelManifest.load(model_dir)
    if manifest.kind != kind or manifest.training_folds != folds:
        raise LungCTError(
            model_dir,
            f"holds a {manifest.kind} of folds {format_folds(manifest.training_folds)}, not a "
            f"{kind} of folds {format_folds(folds)}",
        )
    return saved.replace(steps=steps), manifest


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
    max_minutes: float | None = None,
    progress: bool = True,
    strategy: str = "none",
    mixed_precision: bool = False,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Cut the training cubes, fit the normaliser, and train (or resume) a model folder.

    Training is ``model.fit`` on the suite's contract (see the module docstring): epochs of
    ``checkpoint_every`` steps, the plan's ``steps`` rounded up to whole epochs.

    Args:
        data_dir: LUNA16-layout folder (``annotations.csv``...).
        cache_dir: the per-scan cache (``python -m lungct prepare``).
        folds: training folds.
        kind: ``injector`` or ``remover``.
        model_dir: the model folder.
        plan: the plan of a new folder (default: the ``default`` plan); a resumed run keeps
            the folder's own.
        annotations: nodule table (default ``DATA/annotations.csv``).
        excluded: excluded findings (default ``DATA/annotations_excluded.csv``).
        resume: continue the folder's training to the plan's last epoch.
        steps: training steps (overrides the plan's; on resume, may raise the target).
        max_minutes: this run's time budget: it stops after the batch under way once this
            much wall time is spent, ends the epoch and seals the folder.
        progress: the cube cutting's progress bar and one line per epoch, on stderr.
        strategy: ``none``, ``mirrored`` or ``multiworker``
            (:func:`lungct.training.make_strategy`; made first, before any other TensorFlow
            op). Under ``multiworker`` every worker runs this with the same arguments (a
            resumed run names its ``plan`` on every worker: only the chief reads the folder,
            and tells the others its steps); the chief writes ``model_dir``, the others a
            temporary copy that is removed (:func:`lungct.training.worker_dir`).
        mixed_precision: compute in float16 (GPUs).
        max_seconds: deprecated: the budget in seconds (``max_minutes`` times 60).

    Returns:
        ``model_dir``, ``kind``, ``n_cubes``, ``steps_done``, ``epochs_done``,
        ``train_seconds``, ``stopped`` (``steps`` or ``time limit``), ``stopped_early``,
        ``replicas``, ``workers``, ``chief`` and the last epoch's mean losses and accuracies.

    Raises:
        LungCTError: a folder that holds a model without ``resume``, nothing to resume, a
            resume with another plan, kind or folds, a cache that now gives other series, a
            broken checkpoint of the former loop; a bad ``TF_CONFIG`` or a worker of the
            cluster that stopped.
    """
    require_tensorflow()
    if max_seconds is not None:
        warnings.warn(
            "train_gan(max_seconds=...) is deprecated: pass max_minutes",
            DeprecationWarning,
            stacklevel=2,
        )
        if max_minutes is None:
            max_minutes = max_seconds / 60.0
    folds = sorted(set(int(f) for f in folds))
    # First: MultiWorkerMirroredStrategy must be made before any other TensorFlow op.
    dist = make_strategy(strategy)
    with worker_dir(model_dir, dist) as folder:
        return _train_gan(
            data_dir,
            cache_dir,
            folds,
            kind,
            Path(model_dir),
            folder,
            dist,
            plan=plan,
            annotations=annotations,
            excluded=excluded,
            resume=resume,
            steps=steps,
            max_minutes=max_minutes,
            progress=progress,
            strategy=strategy,
            mixed_precision=mixed_precision,
        )


def _train_gan(
    data_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    folds: list[int],
    kind: str,
    out_dir: Path,
    model_dir: Path,
    dist: Any,
    *,
    plan: GANPlan | None,
    annotations: str | os.PathLike | None,
    excluded: str | os.PathLike | None,
    resume: bool,
    steps: int | None,
    max_minutes: float | None,
    progress: bool,
    strategy: str,
    mixed_precision: bool,
) -> dict[str, Any]:
    """:func:`train_gan` once its strategy is made: ``out_dir`` is the model folder,
    ``model_dir`` the folder this worker writes (the model folder on the chief)."""
    if is_chief(dist):
        plan, manifest = _prepare_folder(model_dir, kind, folds, plan, steps, resume)
    elif resume and plan is None:
        raise LungCTError(
            out_dir,
            "--strategy multiworker --resume needs the plan on every worker (--plan): only "
            "the chief reads --out",
        )
    else:  # the chief alone reads the folder; its steps (a resumed run's) are told below
        plan, manifest = fitted_plan((plan or GANPlan()).replace(steps=steps)), None
    plan_steps, every = from_chief(dist, [plan.steps, plan.checkpoint_every])
    plan = plan.replace(steps=plan_steps, checkpoint_every=every)

    cubes = TrainingCubes.from_cache(
        cache_dir, data_dir, folds, kind, plan, annotations, excluded, progress=progress
    )
    if manifest is not None:
        normaliser = CubeNormaliser.load(model_dir / NORMALISER_FILE)
        if manifest.series != cubes.series:
            raise LungCTError(model_dir, "the cache now gives other training series; start anew")
        # Unseal: the networks change from the next epoch on, and the folder is not a finished
        # model again until this run ends.
        manifest.save(model_dir)
    else:
        model_dir.mkdir(parents=True, exist_ok=True)
        normaliser = CubeNormaliser.fit(cubes.central(), plan.hist_bins)
        normaliser.save(model_dir / NORMALISER_FILE)
        plan.save(model_dir / PLAN_FILE)
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
    summary = fit_gan(
        plan,
        model_dir,
        cubes,
        normaliser,
        manifest,
        resume=resume,
        max_minutes=max_minutes,
        progress=progress,
        strategy=strategy,
        mixed_precision=mixed_precision,
        dist=dist,
    )
    plan.save(model_dir / PLAN_FILE)  # the plan trained (a resumed run may have raised its steps)
    seal_model_dir(  # last: the seal is the folder's done marker
        model_dir,
        "gan",
        train_seconds=manifest.train_seconds,
        data_dir=data_dir,
        seeds={"plan": plan.seed},
        steps=summary["steps_done"],
        extra={
            "kind": kind,
            "epochs": summary["epochs_done"],
            "stopped_by_time": summary["stopped_early"],
            "strategy": strategy,
            "replicas": summary["replicas"],
            "workers": summary["workers"],
        },
        plan=plan.to_dict(),
    )
    return {"model_dir": str(out_dir), "kind": kind, "n_cubes": len(cubes), **summary}


def fit_gan(
    plan: GANPlan,
    model_dir: str | os.PathLike,
    cubes: TrainingCubes,
    normaliser: CubeNormaliser,
    manifest: ModelManifest,
    resume: bool = False,
    max_minutes: float | None = None,
    progress: bool = True,
    strategy: str = "none",
    mixed_precision: bool = False,
    dist: Any = None,
) -> dict[str, Any]:
    """Train a model folder whose plan, normaliser and manifest are written (what
    :func:`train_gan` does after cutting the cubes); the folder is left unsealed.

    ``dist`` is the strategy :func:`train_gan` made for ``strategy`` when the process began
    (``multiworker`` needs it, and ``model_dir`` is then the folder this worker writes,
    :func:`lungct.training.worker_dir`); without it the strategy is made here.

    Returns:
        ``steps_done``, ``epochs_done``, ``train_seconds``, ``stopped``, ``stopped_early``,
        ``replicas``, ``workers``, ``chief`` and the last epoch's mean losses and accuracies.
    """
    require_tensorflow()
    if strategy == "multiworker" and dist is None:
        raise LungCTError(
            None,
            "fit_gan(strategy='multiworker') needs the strategy train_gan makes first "
            "(dist=): train through train_gan",
        )
    out = Path(model_dir)
    epochs = plan_epochs(plan)
    chief = is_chief(dist)
    start_epoch = restored_epoch(out)
    legacy = None if (out / BACKUP).is_dir() else legacy_checkpoint(out)
    if legacy is not None and worker_count(dist) > 1:
        raise LungCTError(
            legacy,
            "a folder of the former loop resumes on one machine only: resume it once "
            "without --strategy multiworker",
        )
    (start_epoch,) = from_chief(dist, [start_epoch])
    with strategy_scope(strategy, mixed_precision, strategy=dist) as scope:
        keras.utils.set_random_seed(plan.seed)
        gan = InpaintingGAN.from_plan(plan, manifest.kind)
        gan.compile(**InpaintingGAN.plan_optimizers(plan), jit_compile=False)
        if legacy is not None:
            start_epoch = restore_legacy(gan, legacy, plan, out) // plan.checkpoint_every
    prepare_model(gan, scope)
    (steps_before,) = from_chief(dist, [steps_done(out, plan, start_epoch)])
    manifest.steps_done = steps_before
    manifest.save(out)

    sized = plan.condition_channels(manifest.kind) > 1
    batches = GANBatches(cubes, normaliser, plan, sized, epoch=start_epoch)
    outputs = EpochOutputs(out, plan, cubes, normaliser, manifest, epochs, steps_before)
    label = f"CT-GAN {manifest.kind}" + ("" if chief else f" {task_name(dist)}")
    callbacks, budget = fit_callbacks(
        out,
        label=label,
        epochs=epochs,
        batch_size=plan.batch_size,
        max_minutes=max_minutes,
        resume=resume,
        shown=("d_loss", "g_loss", "g_l1", "d_acc"),
        keep_checkpoints=plan.keep_checkpoints,
        progress=progress,
        seed=plan.seed,
        data=batches,
        strategy=scope,
        mixed_precision=mixed_precision,
    )
    callbacks = [
        EpochLog(c.filename, append=c.append) if isinstance(c, keras.callbacks.CSVLogger) else c
        for c in callbacks
    ]
    # Before BackupAndRestore (last), after the log: an epoch counts as done only once the
    # networks, the grid and the manifest are written too.
    callbacks.insert(len(callbacks) - 1, outputs)
    if progress:
        what = (
            f"epochs {start_epoch + 1}-{epochs} of {plan.checkpoint_every} steps of "
            f"{plan.batch_size} cubes"
            if start_epoch < epochs
            else f"nothing left to train ({start_epoch} of {epochs} epochs done)"
        )
        print(
            f"[{label}] {len(cubes)} training cubes; {what}"
            + (f" on {replicas(scope)} replicas" if scope is not None else "")
            + (f" of {worker_count(scope)} workers" if worker_count(scope) > 1 else "")
            + (f" (from the former loop's {legacy.name})" if legacy is not None else ""),
            file=sys.stderr,
            flush=True,
        )
    trained = fit_epochs(
        gan, batches, epochs=epochs, start_epoch=start_epoch, callbacks=callbacks, strategy=scope
    )
    if not trained:  # nothing left to train: the networks as they are
        save_model_atomic(gan.generator, out / GENERATOR_FILE)
        save_model_atomic(gan.discriminator, out / DISCRIMINATOR_FILE)
        if not any((out / GRIDS).glob("step_*.png")):
            outputs.write_grid(gan.generator)
    rows = _logged_epochs(out)
    epochs_done = max(rows) + 1 if rows else start_epoch
    manifest.steps_done = steps_done(out, plan, epochs_done)
    manifest.save(out)
    stopped_early = bool(budget.stopped)
    if progress and stopped_early:
        print(f"time budget of {max_minutes} min reached; stopping", file=sys.stderr, flush=True)
    return {
        "steps_done": manifest.steps_done,
        "epochs_done": epochs_done,
        "train_seconds": manifest.train_seconds,
        "stopped": "time limit" if stopped_early else "steps",
        "stopped_early": stopped_early,
        "replicas": replicas(scope),
        "workers": worker_count(scope),
        "chief": chief,
        **{k: v for k, v in manifest.final.items() if k in METRICS},
    }
