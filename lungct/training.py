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
the tests use) and splits each batch between them. ``multiworker`` trains on several machines
at once (TensorFlow's ``MultiWorkerMirroredStrategy``): the same command runs on each, with
``TF_CONFIG`` naming the cluster's workers and this one's place in it (:func:`read_tf_config`).
The plan's batch size is the global batch in every case. ``--mixed-precision`` computes in
float16 with float32 weights (a GPU feature).

**Several workers.** A trainer makes its strategy first (:func:`make_strategy`), before any
other TensorFlow op of the process: ``MultiWorkerMirroredStrategy`` configures TensorFlow's
collective ops, which cannot be done once TensorFlow has started. Then:

- Every worker runs the whole trainer, callbacks and saves included, so each takes part in
  every collective step in the same order; the chief (``task`` 0 of ``worker``, or the
  ``chief`` task) writes the model folder, the others write the same files into a private
  temporary folder that is removed when training ends (:func:`worker_dir`). Nothing is written
  into ``--out`` on those machines. (Keras 3's ``BackupAndRestore`` and ``ModelCheckpoint``,
  unlike tf.keras 2's, do nothing of the kind for workers, hence this. Saving a model needs
  no collective under Keras 3.15, a save on the chief alone goes through, but were a later
  version to need one, every worker saves anyway.)
- Only the chief reads the model folder. For ``--resume`` it tells the others the epoch to
  start from (:func:`from_chief`), and when training begins every worker takes the chief's
  weights and optimiser state, so the folder need not be on storage the workers share.
- Every worker needs the data (the cache, the candidates) at the paths its command names.
  Each worker's ``PyDataset`` yields the whole global batch; TensorFlow splits it: Keras makes
  the ``PyDataset`` a generator dataset, which the strategy rebatches into one piece per
  replica of the cluster and shards by data, each worker keeping its replicas' pieces (with
  one device per worker, worker ``k`` the ``k``-th piece of every batch). Each worker
  therefore cuts every patch of the batch and trains on its share.
- ``--max-minutes`` is agreed after every batch: the run stops on every worker once one of
  them has spent the budget.
- Keras 3.15 cannot run ``model.fit`` under ``MultiWorkerMirroredStrategy`` as it comes
  (keras-team/keras#20585): :func:`prepare_model` adapts the model (see there).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic

CHECKPOINTS = "checkpoints"
BACKUP = "checkpoints/backup"
PRECISION_FILE = "checkpoints/precision.json"
LOGS = "logs"
LOG_FILE = "logs/train_log.csv"
STRATEGIES = ("none", "mirrored", "multiworker")
TF_CONFIG = "TF_CONFIG"
"""The environment variable ``--strategy multiworker`` reads the cluster from."""

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
        under way ends, then its epoch (checkpoint, log row). On several workers, once one of
        them has spent it (they agree after every batch)."""

        def __init__(self, minutes: float | None, strategy: Any = None) -> None:
            super().__init__()
            self.minutes = minutes
            self.strategy = strategy if worker_count(strategy) > 1 else None
            self.stopped = False
            self._start = time.monotonic()

        def on_train_begin(self, logs: dict | None = None) -> None:
            self._start = time.monotonic()
            self.stopped = False

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if self.minutes is None or self.stopped:
                return
            spent = time.monotonic() - self._start > 60.0 * self.minutes
            if self.strategy is not None:  # every worker stops after the same batch
                spent = _cluster(self.strategy).any(spent)
            if spent:
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


def _chief_state_class(base: type) -> type:
    class ChiefState(base):
        """When training begins, every worker of a cluster takes the chief's weights and
        optimiser state: the chief alone reads the model folder (the backup ``--resume``
        restores), and the others start where it starts. Runs after ``BackupAndRestore``."""

        def __init__(self, strategy: Any) -> None:
            super().__init__()
            self.strategy = strategy

        def on_train_begin(self, logs: dict | None = None) -> None:
            variables = list(self.model.variables)
            for optimizer in model_optimizers(self.model):
                variables += list(optimizer.variables)
            _cluster(self.strategy).assign_from_chief(variables)

    return ChiefState


def model_optimizers(model: Any) -> list[Any]:
    """The optimisers a model trains with: its compiled ``optimizer`` and any other
    optimiser it holds as an attribute (a ``train_step`` model with two, such as the
    CT-GAN's ``g_optimizer`` and ``d_optimizer``), each once."""
    optimizer_class = _keras().optimizers.Optimizer
    found: list[Any] = []
    for value in (getattr(model, "optimizer", None), *vars(model).values()):
        if isinstance(value, optimizer_class) and all(value is not f for f in found):
            found.append(value)
    return found


def time_budget(minutes: float | None, strategy: Any = None) -> Any:
    """A callback that stops the run after ``minutes`` of wall time (None: never); under a
    multiworker ``strategy``, on every worker once one has spent it."""
    return _callback_class("TimeBudget", _time_budget_class)(minutes, strategy)


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
    strategy: Any = None,
    mixed_precision: bool = False,
) -> tuple[list[Any], Any]:
    """The callbacks of a stage's ``model.fit``, in order, and its time-budget callback.

    ``before`` are the stage's own callbacks that add to the epoch's logs (a validation
    metric, the learning-rate schedule); they run first, so the log, TensorBoard and the
    stderr line see what they add. ``BackupAndRestore`` runs last. The random layers are
    seeded from ``(seed, epoch)`` at every epoch, and ``data`` (a ``PyDataset`` with a
    ``set_epoch(epoch)`` method) is told each epoch as it begins, so a resumed run trains as
    an uninterrupted one does. ``model_dir`` is the folder this worker writes
    (:func:`worker_dir`); under a multiworker ``strategy`` the time budget is agreed between
    the workers and, once the backup is restored, every worker takes the chief's state.
    ``mixed_precision`` (the run's ``--mixed-precision``) is recorded, and a backup made under
    the other policy is not resumed.

    Raises:
        LungCTError: ``resume`` of a backup made with the other ``mixed_precision``.
    """
    keras = _keras()
    folder = Path(model_dir)
    (folder / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    (folder / LOGS).mkdir(parents=True, exist_ok=True)
    _check_precision(folder, "mixed_float16" if mixed_precision else "float32", resume)
    budget = time_budget(max_minutes, strategy)
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
    if worker_count(strategy) > 1:
        callbacks.append(_callback_class("ChiefState", _chief_state_class)(strategy))
    return callbacks, budget


def fit_epochs(
    model: Any,
    data: Any,
    *,
    epochs: int,
    start_epoch: int,
    callbacks: Sequence[Any],
    strategy: Any = None,
    validation_data: Any = None,
) -> bool:
    """Train ``model`` through ``model.fit`` from ``start_epoch`` to ``epochs`` with the
    contract's ``callbacks`` (:func:`fit_callbacks`); ``False`` when no epoch was left.

    Keras does not shuffle: the stage's data orders each epoch from ``(seed, epoch)``, so a
    resumed run sees the batches an uninterrupted one does. Keras prints nothing (the
    contract's own line does). A worker of a cluster whose peer stopped raises one line
    (:func:`cluster_errors`). ``data`` is closed afterwards where it has a ``close`` method.
    """
    if start_epoch >= epochs:
        return False
    try:
        with cluster_errors(strategy):
            model.fit(
                data,
                validation_data=validation_data,
                epochs=epochs,
                initial_epoch=start_epoch,
                callbacks=list(callbacks),
                shuffle=False,
                verbose=0,
            )
    finally:
        close = getattr(data, "close", None)
        if callable(close):
            close()
    return True


def _check_precision(folder: Path, policy: str, resume: bool) -> None:
    """Record the dtype policy a training runs under (``checkpoints/precision.json``) and
    refuse to resume a backup under another one: Keras restores a mixed-precision optimizer's
    state into a float32 one (or the reverse) only in part, without a word.

    Raises:
        LungCTError: ``resume`` with a backup made under another policy.
    """
    record = folder / PRECISION_FILE
    if resume and record.is_file() and (folder / BACKUP).is_dir():
        saved = read_json(record, "precision record not found").get("policy")
        if saved != policy:
            flag = "with" if saved == "mixed_float16" else "without"
            raise LungCTError(
                folder,
                f"this training ran under the {saved} policy: resume it {flag} "
                "--mixed-precision (its optimizer's state would not carry over)",
            )
    write_json_atomic(record, {"policy": policy})


def read_log(model_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of ``logs/train_log.csv`` (none if absent)."""
    import csv

    path = Path(model_dir) / LOG_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def convergence(
    model_dir: str | os.PathLike,
    metric: str = "val_loss",
    tail: float = 0.25,
    tolerance: float = 0.02,
) -> dict[str, Any] | None:
    """Whether a training had stopped improving, from its log: the best ``metric`` (lower is
    better) of the last ``tail`` of its epochs against the best before them.

    ``gain`` is that relative improvement, ``(best_before - best_last) / |best_before|``;
    ``plateau`` is ``gain < tolerance`` (the last quarter of the epochs bettered the metric by
    less than 2 %: more epochs of the same schedule would gain little). ``ended_by`` says
    whether the run reached its plan's epochs or stopped on its budget. Reads
    ``logs/train_log.csv`` (or a former ``train_log.csv`` beside the model); ``None`` without
    a log, without the metric, or with fewer than 4 epochs of it.
    """
    import csv

    folder = Path(model_dir)
    rows = read_log(folder)
    if not rows and (folder / "train_log.csv").is_file():
        with open(folder / "train_log.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
    values = [log_float(r, metric) for r in rows]
    values = [v for v in values if math.isfinite(v)]
    if len(values) < 4:
        return None
    k = max(1, math.ceil(len(values) * tail))
    before, last = min(values[:-k]), min(values[-k:])
    gain = (before - last) / abs(before) if before else 0.0
    planned = None
    if (folder / "plan.json").is_file():
        planned = read_json(folder / "plan.json", "plan not found").get("epochs")
    epochs = len(rows)
    return {
        "metric": metric,
        "epochs": epochs,
        "plan_epochs": planned,
        "ended_by": "epochs" if planned is None or epochs >= planned else "budget",
        "best": min(values),
        "gain": gain,
        "plateau": gain < tolerance,
    }


def log_float(row: dict[str, str], key: str) -> float:
    """A number of a log row; NaN where it is missing or empty."""
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return math.nan


def _unknown_strategy(name: str) -> LungCTError:
    return LungCTError(None, f"--strategy must be one of {', '.join(STRATEGIES)}, not {name!r}")


@contextlib.contextmanager
def strategy_scope(
    name: str = "none", mixed_precision: bool = False, strategy: Any = None
) -> Iterator[Any]:
    """Build and compile the model inside this block; yields the strategy (None for
    ``none``).

    ``strategy`` is the one :func:`make_strategy` made for ``name`` when the process began
    (what the trainers do: ``multiworker`` must come before any other TensorFlow op); without
    it the strategy is made here.

    Raises:
        LungCTError: an unknown strategy.
    """
    if name not in STRATEGIES:
        raise _unknown_strategy(name)
    keras = _keras()
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        if strategy is None:
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
    every GPU, or every logical CPU where TensorFlow sees no GPU; ``multiworker`` is
    ``MultiWorkerMirroredStrategy`` on the cluster ``TF_CONFIG`` names (every GPU of each
    worker, or its CPU). Make it before any other TensorFlow op of the process. The strategy
    starts this worker's server and waits until every worker of the cluster has started.

    Raises:
        LungCTError: an unknown strategy; for ``multiworker``, a missing or malformed
            ``TF_CONFIG`` (:func:`read_tf_config`) or a worker that cannot start (its port
            taken, TensorFlow already started in this process).
    """
    if name == "none":
        return None
    if name not in STRATEGIES:
        raise _unknown_strategy(name)
    if name == "multiworker":
        return _multiworker_strategy(read_tf_config())
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _multiworker_strategy(config: dict[str, Any]) -> Any:
    import tensorflow as tf

    task = config["task"]
    where = f"{task['type']} {task['index']} ({config['cluster'][task['type']][task['index']]})"
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as exc:
        if "startup" in str(exc):
            raise LungCTError(
                None,
                "--strategy multiworker: TensorFlow had started before the strategy was made "
                "(make it first in the process)",
            ) from None
        raise LungCTError(None, f"--strategy multiworker: {where}: {_first_line(exc)}") from None
    except (ValueError, tf.errors.OpError) as exc:
        raise LungCTError(
            None, f"--strategy multiworker: {where} cannot start: {_first_line(exc)}"
        ) from None


_TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
    '"index": 0}}'
)


def _tf_config_error(problem: str) -> LungCTError:
    return LungCTError(None, f"TF_CONFIG {problem} (e.g. {_TF_CONFIG_EXAMPLE})")


def read_tf_config(text: str | None = None) -> dict[str, Any]:
    """``TF_CONFIG`` (or ``text``), checked: ``{"cluster": {"worker": ["host:port", ...]},
    "task": {"type": "worker", "index": i}}``, with an optional one-address ``"chief"`` job.
    Every worker runs with the same cluster and its own task. The ``worker`` task 0 (or the
    ``chief``) is the chief: it writes the model folder.

    Raises:
        LungCTError: unset, not JSON, another job than ``chief`` and ``worker``, an address
            that is not ``host:port``, a task that is not in the cluster (one line, with an
            example).
    """
    if text is None:
        text = os.environ.get(TF_CONFIG, "")
    if not text.strip():
        raise LungCTError(
            None,
            "--strategy multiworker needs TF_CONFIG: the cluster's workers and this worker's "
            f"task as JSON, e.g. TF_CONFIG='{_TF_CONFIG_EXAMPLE}'",
        )
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise _tf_config_error(f"is not JSON ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise _tf_config_error("must be a JSON object with cluster and task")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise _tf_config_error('lacks "cluster": the workers\' addresses by job')
    others = sorted(set(cluster) - {"chief", "worker"})
    if others:
        raise _tf_config_error(
            f"names jobs {', '.join(others)}: --strategy multiworker trains on chief and "
            "worker tasks only"
        )
    seen: set[str] = set()
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise _tf_config_error(f'"{job}" must be a list of host:port addresses')
        if job == "chief" and len(addresses) != 1:
            raise _tf_config_error('"chief" must name one address')
        for address in addresses:
            host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise _tf_config_error(f"{job} address {address!r} is not host:port")
            if address in seen:
                raise _tf_config_error(f"names {address} twice")
            seen.add(address)
    if not isinstance(task, dict):
        raise _tf_config_error('lacks "task": this worker\'s type and index')
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster:
        raise _tf_config_error(f"task type {kind!r} is not a job of the cluster")
    if isinstance(index, bool) or not isinstance(index, int):
        raise _tf_config_error(f"task index {index!r} is not an integer")
    if not 0 <= index < len(cluster[kind]):
        raise _tf_config_error(
            f"task index {index} is out of range: {kind} has {len(cluster[kind])} address(es)"
        )
    return {"cluster": cluster, "task": {"type": kind, "index": index}}


def _multiworker(strategy: Any) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    return resolver is not None and bool(resolver.cluster_spec().jobs)


def is_chief(strategy: Any) -> bool:
    """Whether this process writes the model folder: True without a strategy, under
    ``mirrored``, and on the chief of a multiworker cluster."""
    return strategy is None or bool(strategy.extended.should_checkpoint)


def worker_count(strategy: Any) -> int:
    """The processes that train together (1 but under ``multiworker``)."""
    if not _multiworker(strategy):
        return 1
    spec = strategy.cluster_resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)


def task_name(strategy: Any) -> str:
    """This worker as ``TF_CONFIG`` names it (``worker 1``); empty outside a cluster."""
    if not _multiworker(strategy):
        return ""
    resolver = strategy.cluster_resolver
    return f"{resolver.task_type} {resolver.task_id}"


@contextlib.contextmanager
def worker_dir(model_dir: str | os.PathLike, strategy: Any) -> Iterator[Path]:
    """The folder this process writes the training into: ``model_dir`` itself on the chief
    (and without a cluster); on the other workers of a cluster, a folder of the same name in
    a private temporary folder, removed when the block ends. Those workers write what the
    chief writes (checkpoints, logs, the final model) so that they run every step the chief
    runs, and nothing reaches ``model_dir``."""
    if is_chief(strategy):
        yield Path(model_dir)
        return
    scratch = Path(tempfile.mkdtemp(prefix="lungct-worker-"))
    try:
        yield scratch / (Path(model_dir).name or "model")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def from_chief(strategy: Any, values: Sequence[int]) -> list[int]:
    """The chief's ``values`` (integers: an epoch to start from, a count) on every worker of
    a multiworker cluster; ``values`` themselves otherwise. What the others pass is ignored.

    Raises:
        LungCTError: another worker stopped or cannot be reached (:func:`cluster_errors`).
    """
    if worker_count(strategy) < 2:
        return [int(v) for v in values]
    import numpy as np

    with cluster_errors(strategy):
        (got,) = _cluster(strategy).from_chief([np.asarray(values, dtype=np.float64)])
    return [round(float(v)) for v in np.asarray(got).reshape(-1)]


def chief_floats(strategy: Any, values: Sequence[float]) -> list[float]:
    """The chief's ``values`` (floats, exact to float64) on every worker of a multiworker
    cluster; ``values`` themselves otherwise. Every worker calls it at the same point (a
    collective), e.g. for a quantity each measures on its own clock.

    Raises:
        LungCTError: another worker stopped or cannot be reached (:func:`cluster_errors`).
    """
    if worker_count(strategy) < 2:
        return [float(v) for v in values]
    import numpy as np

    with cluster_errors(strategy):
        (got,) = _cluster(strategy).from_chief([np.asarray(values, dtype=np.float64)])
    return [float(v) for v in np.asarray(got).reshape(-1)]


@contextlib.contextmanager
def cluster_errors(strategy: Any) -> Iterator[None]:
    """Turn the error TensorFlow raises on one worker when another has stopped (its
    collective ops aborted: the peer's heartbeats stopped or its socket closed) into a
    one-line :class:`LungCTError`; the worker that stopped has printed why. Nothing is done
    outside a cluster."""
    if worker_count(strategy) < 2:
        yield
        return
    import tensorflow as tf

    try:
        yield
    except (
        tf.errors.UnavailableError,
        tf.errors.CancelledError,
        tf.errors.AbortedError,
        tf.errors.DeadlineExceededError,
    ) as exc:
        raise LungCTError(
            None,
            f"{task_name(strategy)}: another worker of the cluster stopped or cannot be "
            f"reached ({_first_line(exc)[:200]}); its own output says why",
        ) from None


_CLUSTERS: dict[int, Any] = {}


def _cluster(strategy: Any) -> Any:
    """The collective helpers of a multiworker strategy, traced once per process."""
    key = id(strategy)
    if key not in _CLUSTERS:
        _CLUSTERS[key] = _Cluster(strategy)
    return _CLUSTERS[key]


class _Cluster:
    """Two collectives the contract needs besides training: the chief's values on every
    worker (a sum to which only the first replica of the chief adds its values: global
    replica 0 is the chief's first device) and whether any worker says yes. Values travel as
    float64, exact for float32 weights and for integers below 2**53."""

    def __init__(self, strategy: Any) -> None:
        import tensorflow as tf

        self.strategy = strategy

        def first_replica(values: list) -> list:
            ctx = tf.distribute.get_replica_context()
            mine = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float64)
            return ctx.all_reduce("SUM", [v * mine for v in values])

        def total(values: list) -> list:
            # identity: a value made on the replica's device (the argument has none)
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce("SUM", [tf.identity(v) for v in values])

        self._first = tf.function(lambda values: strategy.run(first_replica, args=(values,)))
        self._total = tf.function(lambda values: strategy.run(total, args=(values,)))

    def _local(self, value: Any) -> Any:
        return self.strategy.experimental_local_results(value)[0]

    def from_chief(self, arrays: list) -> list:
        """The chief's arrays (float64) on every worker."""
        import tensorflow as tf

        values = [tf.constant(a, dtype=tf.float64) for a in arrays]
        return [self._local(v) for v in self._first(values)]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any worker."""
        import tensorflow as tf

        (count,) = self._total([tf.constant(1.0 if flag else 0.0, dtype=tf.float64)])
        return float(self._local(count)) > 0.0

    def assign_from_chief(self, variables: list) -> None:
        """Every numeric variable takes the chief's value."""
        import tensorflow as tf

        numeric = [v for v in variables if tf.as_dtype(v.dtype).is_floating or _integer(v)]
        if not numeric:
            return
        with cluster_errors(self.strategy):
            values = self._first([tf.cast(tf.convert_to_tensor(v), tf.float64) for v in numeric])
            for variable, value in zip(numeric, values, strict=True):
                variable.assign(tf.cast(self._local(value), variable.dtype))


def _integer(variable: Any) -> bool:
    import tensorflow as tf

    return tf.as_dtype(variable.dtype).is_integer


def prepare_model(model: Any, strategy: Any) -> Any:
    """Make ``model.fit`` of the installed Keras (3.15) work under a multiworker ``strategy``;
    the model unchanged otherwise. Returns the model.

    Keras 3.15 fails twice there (keras-team/keras#20585): before training it reduces the
    first batch across workers with ``strategy.reduce``, which takes one value, not the
    batch's tuple ("Attempt to convert a value (PerReplica ...)"); and it reduces each step's
    scalar logs with ``axis=0`` ("Invalid reduction dimension 0 for input with 0
    dimensions"). Here the model builds from this worker's own first slice (only its shapes
    matter), and its training and evaluation steps return each log value as a one-element
    vector, which that reduction averages over the workers into a scalar. Both on this model
    object only; saved files are not affected.
    """
    if worker_count(strategy) < 2:
        return model
    import types

    import keras
    import tensorflow as tf

    def local(value: Any) -> Any:
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    build = type(model)._maybe_symbolic_build

    def maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> Any:
        if iterator is not None and data_batch is None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(local, next(batches))
                break
        return build(self, iterator=None, data_batch=data_batch)

    def vectors(step: Callable) -> Callable:
        def step_with_vector_logs(data: Any) -> Any:
            return keras.tree.map_structure(
                lambda v: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0 else v,
                step(data),
            )

        return step_with_vector_logs

    model._maybe_symbolic_build = types.MethodType(maybe_symbolic_build, model)
    model.train_step = vectors(model.train_step)
    model.test_step = vectors(model.test_step)
    return model


def local_call(model: Any) -> Callable[[Any], Any]:
    """A compiled call of this process's copy of a model built under a ``tf.distribute``
    strategy, inputs (an array or a list of arrays) in, a NumPy array out.

    Under a strategy ``predict_on_batch`` hands every replica the whole batch and returns
    their outputs one after another (``num_replicas_in_sync`` copies), and under
    ``multiworker`` it is a collective step every worker would have to run; this call reads
    the variables' local copy, on this process alone (validation, grids).
    """
    import numpy as np
    import tensorflow as tf

    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(inputs: Any) -> Any:
        return np.asarray(call(tf.nest.map_structure(tf.convert_to_tensor, inputs)))

    return predict


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
        "logical CPU without one), each batch split between them; multiworker: several "
        "machines, each running this command with TF_CONFIG naming the cluster and its task "
        "(the chief, worker 0, writes --out); the plan's batch is the global batch",
    )
    parser.add_argument(
        "--mixed-precision",
        action="store_true",
        help="compute in float16 with float32 weights (for GPUs)",
    )
