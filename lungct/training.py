"""The training contract of the suite's stages: a model folder, ``model.fit`` with Keras
callbacks, one time budget, one resume, and the device strategy.

A stage's trainer supplies what differs (the model, its data as a ``keras.utils.PyDataset``,
its loss) and gets the rest here. Its model folder::

    OUT/plan.json                     the plan the model is trained with
    OUT/manifest.json                 folds and series; sealed when training ends (the seal
                                      is the done marker, :mod:`lungct.modeldir`)
    OUT/model.keras                   the final model, written atomically
    OUT/checkpoints/epoch_NNN.keras   model + optimiser after epoch NNN (atomic; the newest
                                      ``--keep-checkpoints`` kept)
    OUT/checkpoints/backup/           Keras' ``BackupAndRestore`` state: weights, optimiser and
                                      the epoch reached, rewritten at the end of every epoch
    OUT/logs/train_log.csv            one row per epoch (``CSVLogger``; epochs counted from 0)
    OUT/logs/train/, logs/validation/ TensorBoard event files (``tensorboard --logdir OUT/logs``)

**Time budget and resume.** ``--max-minutes`` is the budget of this run: once it is spent the
run stops after the current batch, ends its epoch (checkpoint, log row) and seals the folder.
``--resume`` continues the run to the plan's last epoch from the backup: a ``kill -9`` loses at
most the epoch under way, and a run stopped by its budget goes on from where it stopped.

**Devices.** ``--strategy none`` trains on TensorFlow's default device; ``mirrored`` copies the
model to every GPU of this machine (to every logical CPU where there is no GPU, which is what
the tests use) and splits each batch between them. The plan's batch size is the global batch
either way. ``--mixed-precision`` computes in float16 with float32 weights (a GPU feature).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lungct.errors import LungCTError

CHECKPOINTS = "checkpoints"
BACKUP = "checkpoints/backup"
LOGS = "logs"
LOG_FILE = "logs/train_log.csv"
STRATEGIES = ("none", "mirrored")

_CHECKPOINT = re.compile(r"^epoch_(\d+)\.keras$")


def latest_checkpoint(model_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """``(epoch, path)`` of the newest ``checkpoints/epoch_NNN.keras`` of a model folder."""
    folder = Path(model_dir) / CHECKPOINTS
    found = []
    for p in folder.glob("epoch_*.keras") if folder.is_dir() else ():
        m = _CHECKPOINT.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found) if found else None


def restored_epoch(model_dir: str | os.PathLike) -> int:
    """The epochs a resumed run starts after: what ``BackupAndRestore`` recorded (0 if none)."""
    path = Path(model_dir) / BACKUP / "training_metadata.json"
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def has_training_state(model_dir: str | os.PathLike) -> bool:
    """Whether the folder holds a training to resume (a backup or an epoch checkpoint)."""
    folder = Path(model_dir)
    return (folder / BACKUP).is_dir() or latest_checkpoint(folder) is not None


def training_state(model_dir: str | os.PathLike) -> str:
    """What a model folder holds, for whoever runs the stages: ``"done"`` (its manifest is
    sealed, the training ended, whatever the stage, and every file the seal lists is there),
    ``"started"`` (a manifest or a training state: ``--resume`` continues it) or ``"none"``."""
    from lungct.modeldir import MANIFEST_NAME, is_sealed

    folder = Path(model_dir)
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and is_sealed(manifest):
        files = manifest.get("files")
        if not isinstance(files, dict) or all((folder / name).is_file() for name in files):
            return "done"
    if manifest is not None or has_training_state(folder):
        return "started"
    return "none"


def _keras() -> Any:
    import keras

    return keras


def _callback_base() -> type:
    return _keras().callbacks.Callback


_CLASSES: dict[str, type] = {}


def _callback_class(name: str, make: Callable[[type], type]) -> type:
    """A callback class, made on first use: importing this module does not import Keras (the
    suite's light commands never pay for it)."""
    if name not in _CLASSES:
        _CLASSES[name] = make(_callback_base())
    return _CLASSES[name]


def _time_budget_class(base: type) -> type:
    class TimeBudget(base):
        """Stop the run once ``minutes`` of wall time have passed since it began; the batch
        under way ends, then its epoch (checkpoint, log row)."""

        def __init__(self, minutes: float | None) -> None:
            super().__init__()
            self.minutes = minutes
            self.stopped = False
            self._start = time.monotonic()

        def on_train_begin(self, logs: dict | None = None) -> None:
            self._start = time.monotonic()
            self.stopped = False

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if self.minutes is None or self.stopped:
                return
            if time.monotonic() - self._start > 60.0 * self.minutes:
                self.stopped = True
                self.model.stop_training = True

    return TimeBudget


def _epoch_timer_class(base: type) -> type:
    class EpochTimer(base):
        """Adds ``seconds`` (wall time of the epoch), ``steps`` and ``train_samples_per_s``
        (samples over the time inside training steps, the epoch's first step left out: it
        traces the graph) to each epoch's logs."""

        def __init__(self, batch_size: int) -> None:
            super().__init__()
            self.batch_size = batch_size

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._t0 = time.monotonic()
            self._steps = 0
            self._step_time = 0.0

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            self._ts = time.monotonic()

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if self._steps:
                self._step_time += time.monotonic() - self._ts
            self._steps += 1

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if logs is None:
                return
            logs["seconds"] = time.monotonic() - self._t0
            logs["steps"] = float(self._steps)
            timed = self._steps - 1
            logs["train_samples_per_s"] = (
                timed * self.batch_size / self._step_time if timed > 0 and self._step_time else 0.0
            )

    return EpochTimer


def _epoch_seeds_class(base: type) -> type:
    class EpochSeeds(base):
        """Set every random layer's seed (Keras' ``SeedGenerator`` state: dropout, noise) from
        ``(seed, epoch)`` when an epoch begins. Keras saves no seed state with the weights, so
        without this a resumed run would draw other dropout masks than an uninterrupted one."""

        def __init__(self, seed: int) -> None:
            super().__init__()
            self.seed = int(seed)

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            import numpy as np

            states = [
                v
                for v in self.model.non_trainable_variables
                if v.path.endswith("seed_generator_state")
            ]
            for k, state in enumerate(states):
                value = np.array([self.seed * 1009 + k, int(epoch) << 24], dtype=np.int64)
                state.assign(value.astype(state.dtype))

    return EpochSeeds


def _epoch_data_class(base: type) -> type:
    class EpochData(base):
        """Tells the stage's ``PyDataset`` which epoch begins (``data.set_epoch(epoch)``).

        A ``PyDataset``'s own ``on_epoch_end`` cannot count epochs: Keras also calls it once
        before the first epoch, and ``initial_epoch`` is not passed to it. The callback's
        epoch is the one ``fit`` trains (resumed runs included)."""

        def __init__(self, data: Any) -> None:
            super().__init__()
            self.data = data

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.data.set_epoch(int(epoch))

    return EpochData


def _epoch_line_class(base: type) -> type:
    class EpochLine(base):
        """One line per epoch on stderr (stdout is for results)."""

        def __init__(self, label: str, epochs: int, shown: tuple[str, ...]) -> None:
            super().__init__()
            self.label, self.epochs, self.shown = label, epochs, shown

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            parts = [f"{k} {float(logs[k]):.4g}" for k in self.shown if k in logs]
            if "seconds" in logs:
                parts.append(f"{float(logs['seconds']):.0f} s")
            print(
                f"[{self.label}] epoch {epoch + 1}/{self.epochs}: " + ", ".join(parts),
                file=sys.stderr,
                flush=True,
            )

    return EpochLine


def _epoch_checkpoint_class(base: type) -> type:
    class EpochCheckpoint(base):
        """``checkpoints/epoch_NNN.keras`` after every epoch: the whole model with its
        optimiser, written to a temporary file, checked and renamed (a kill never leaves half
        a checkpoint); only the newest ``keep`` are kept (0: all)."""

        def __init__(self, model_dir: Path, keep: int = 0) -> None:
            super().__init__()
            self.model_dir, self.keep = Path(model_dir), keep

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            save_model_atomic(
                self.model, self.model_dir / CHECKPOINTS / f"epoch_{epoch + 1:03d}.keras"
            )
            if self.keep > 0:
                found = sorted((self.model_dir / CHECKPOINTS).glob("epoch_*.keras"))
                for path in found[: -self.keep]:
                    path.unlink(missing_ok=True)

    return EpochCheckpoint


def time_budget(minutes: float | None) -> Any:
    """A callback that stops the run after ``minutes`` of wall time (None: never)."""
    return _callback_class("TimeBudget", _time_budget_class)(minutes)


def save_model_atomic(model: Any, path: str | os.PathLike) -> None:
    """``model.save`` to a temporary ``.keras`` file, check it, then rename."""
    from lungct.fileio import atomic_path
    from lungct.modeldir import keras_file_problem

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".keras", check=keras_file_problem) as tmp:
        model.save(tmp)


def fit_callbacks(
    model_dir: str | os.PathLike,
    *,
    label: str,
    epochs: int,
    batch_size: int,
    max_minutes: float | None,
    resume: bool,
    shown: tuple[str, ...] = ("loss", "val_loss"),
    keep_checkpoints: int = 0,
    progress: bool = True,
    before: tuple[Any, ...] = (),
    tensorboard: bool = True,
    seed: int = 0,
    data: Any = None,
) -> tuple[list[Any], Any]:
    """The callbacks of a stage's ``model.fit``, in order, and its time-budget callback.

    ``before`` are the stage's own callbacks that add to the epoch's logs (a validation
    metric, the learning-rate schedule); they run first, so the log, TensorBoard and the
    stderr line see what they add. ``BackupAndRestore`` runs last. The random layers are
    seeded from ``(seed, epoch)`` at every epoch, and ``data`` (a ``PyDataset`` with a
    ``set_epoch(epoch)`` method) is told each epoch as it begins, so a resumed run trains as
    an uninterrupted one does.
    """
    keras = _keras()
    folder = Path(model_dir)
    (folder / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    (folder / LOGS).mkdir(parents=True, exist_ok=True)
    budget = time_budget(max_minutes)
    callbacks: list[Any] = [
        *([_callback_class("EpochData", _epoch_data_class)(data)] if data is not None else []),
        _callback_class("EpochSeeds", _epoch_seeds_class)(seed),
        *before,
        budget,
        _callback_class("EpochTimer", _epoch_timer_class)(batch_size),
        _callback_class("EpochCheckpoint", _epoch_checkpoint_class)(folder, keep_checkpoints),
        keras.callbacks.CSVLogger(str(folder / LOG_FILE), append=resume),
    ]
    if tensorboard:
        callbacks.append(
            keras.callbacks.TensorBoard(str(folder / LOGS), write_graph=False, update_freq="epoch")
        )
    if progress:
        callbacks.append(_callback_class("EpochLine", _epoch_line_class)(label, epochs, shown))
    # Last, so an epoch counts as done only once its checkpoint and log row are written: a kill
    # in between runs that epoch again (and logs it twice) rather than losing its row.
    callbacks.append(
        keras.callbacks.BackupAndRestore(
            str(folder / BACKUP), double_checkpoint=True, delete_checkpoint=False
        )
    )
    return callbacks, budget


def read_log(model_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of ``logs/train_log.csv`` (none if absent)."""
    import csv

    path = Path(model_dir) / LOG_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def log_float(row: dict[str, str], key: str) -> float:
    """A number of a log row; NaN where it is missing or empty."""
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return math.nan


@contextlib.contextmanager
def strategy_scope(name: str = "none", mixed_precision: bool = False) -> Iterator[Any]:
    """Build and compile the model inside this block; yields the strategy (None for
    ``none``).

    Raises:
        LungCTError: an unknown strategy.
    """
    if name not in STRATEGIES:
        raise LungCTError(None, f"--strategy must be one of {', '.join(STRATEGIES)}, not {name!r}")
    keras = _keras()
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        strategy = make_strategy(name)
        if strategy is None:
            yield None
        else:
            with strategy.scope():
                yield strategy
    finally:
        if mixed_precision:
            keras.mixed_precision.set_global_policy("float32")


def make_strategy(name: str) -> Any:
    """The ``tf.distribute`` strategy of ``--strategy`` (None for ``none``): ``mirrored`` uses
    every GPU, or every logical CPU where TensorFlow sees no GPU."""
    if name == "none":
        return None
    if name not in STRATEGIES:
        raise LungCTError(None, f"--strategy must be one of {', '.join(STRATEGIES)}, not {name!r}")
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices])


def replicas(strategy: Any) -> int:
    """Replicas that train in step (1 without a strategy)."""
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)


def add_device_arguments(parser: Any) -> None:
    """The ``--strategy`` and ``--mixed-precision`` options of a ``train`` command."""
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="none",
        help="none: TensorFlow's default device; mirrored: every GPU of this machine (every "
        "logical CPU without one), each batch split between them; the plan's batch is the "
        "global batch",
    )
    parser.add_argument(
        "--mixed-precision",
        action="store_true",
        help="compute in float16 with float32 weights (for GPUs)",
    )
