"""A trained model folder's seal: done marker, file checksums, trained plan, provenance.

Every stage writes ``manifest.json`` into its model folder while it trains (folds, series,
plan name; see each stage's trainer). When training ends, :func:`seal_model_dir` adds these
keys to it::

    "format": 1                      manifest format; a newer one is refused, not guessed at
    "files": {"model.keras": "<sha256>", "plan.json": "<sha256>", ...}
                                     every top-level file of the folder but the manifest
    "plan_sha256": "<sha256>"        digest of the plan the weights were trained with (the
                                     canonical JSON of its fields, :func:`plan_digest`)
    "trained_plan": {...}            that plan's fields, so an edit can be named field by field
    "provenance": {...}              training data, seeds, steps, wall time, hardware, versions

The seal is the folder's done marker: it is written once, last, when training has ended. A
killed or still running training leaves a manifest without it (and a resumed one takes it away
until it ends again), so its ``model.keras``, however complete it looks, is refused unless the
caller allows unfinished folders (``--allow-unfinished``).

Loading goes through :func:`verify_model_dir` before a weight is read: an unfinished folder, a
file that changed since (a corrupted download, an edited weight file), a ``plan.json`` that is
no longer the trained plan (even when the folder was sealed again after the edit), a manifest
of the wrong shape or written by a newer version of the suite, or another stage's folder stops
with one line naming the file. Folders sealed before the seal carried the plan have no
``plan_sha256``; their ``plan.json`` is held by its checksum in ``files`` all the same.
``checkpoints/`` and ``logs/`` are training state, not the model, and are not sealed.

:func:`load_keras_model` then reads a ``.keras`` file in Keras safe mode, after checking its
config without running any of it: a class from outside Keras and this suite, a Lambda layer
(Python code), another stage's network or an architecture that does not fit the plan is refused
in one line before Keras deserializes anything.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic
from lungct.plans import PLAN_FORMAT_KEY, check_format_version, check_value_types

MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
MANIFEST_FORMAT = 1
SEAL_KEYS = ("format", "files", "plan_sha256", "trained_plan", "provenance")
PLAN_RECORD_KEYS = ("plan_sha256", "trained_plan")
STAGE_NAMES = {
    "unet": "U-Net",
    "centernet": "CenterNet",
    "fpr": "MGI-CNN",
    "gan": "CT-GAN",
    "malignancy": "malignancy CNN",
}
TRUSTED_PACKAGES = ("keras", "unet_candidates", "fp_reduction_3dcnn", "ct_gan_augment")
"""Packages whose classes a model file may name: Keras and the suite's own stages."""
CODE_CLASSES = ("Lambda", "__lambda__")
"""Keras objects that carry Python code (bytecode) in the file."""
MANIFEST_TYPES: dict[str, Any] = {
    "format": int,
    "files": dict[str, str],
    "plan_sha256": str,
    "trained_plan": dict,
    "provenance": dict,
    "train_folds": list[int],
    "val_folds": list[int],
    "test_folds": list[int],
    "training_folds": list[int],
    "train_series": list[str],
    "val_series": list[str],
    "series": list[str],
}
"""JSON types of the manifest keys that loading and the model set read (any stage)."""
PROVENANCE_TYPES: dict[str, Any] = {
    "stage": str,
    "data": dict,
    "seeds": dict,
    "steps": int | None,
    "train_seconds": float,
    "hardware": dict,
    "versions": dict,
    "sealed": str,
}
DEMO_GRADE_SECONDS = 600.0
"""A stage trained for less than this (wall seconds, all sittings together) is demo-grade:
the demo trains each stage for 2-4 minutes."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def strip_seal(manifest: dict) -> dict:
    """The manifest without the seal's keys (for the stages' own manifest readers)."""
    return {k: v for k, v in manifest.items() if k not in SEAL_KEYS}


def sealed_files(model_dir: str | os.PathLike) -> list[str]:
    """The files a seal covers: every top-level file but the manifest and temporaries."""
    root = Path(model_dir)
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
    )


def package_versions() -> dict[str, str]:
    """Versions of the packages a trained model depends on (those importable here)."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "keras", "tensorflow", "SimpleITK"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    try:
        import keras

        versions["keras_backend"] = keras.backend.backend()
    except ImportError:
        pass
    return versions


def hardware() -> dict[str, Any]:
    """The machine training ran on: system, processor, CPU count and accelerators."""
    info: dict[str, Any] = {
        "system": platform.system(),
        "machine": platform.machine(),
        "processor": _cpu_model() or platform.processor(),
        "cpu_count": os.cpu_count(),
        "gpus": [],
    }
    try:
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            info["gpus"] = [
                tf.config.experimental.get_device_details(d).get("device_name", d.name)
                for d in tf.config.list_physical_devices("GPU")
            ]
    except Exception:  # no framework or no driver: a CPU machine as far as we can tell
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def describe_data(data_dir: str | os.PathLike | None) -> dict[str, Any]:
    """What a training data folder is, in words that survive moving the model elsewhere.

    A synthetic mini-LUNA is described by its ``synth.json`` (seed, size, scans, generator
    version, background); anything else by its folder name and scan count.
    """
    if data_dir is None:
        return {"kind": "unknown"}
    root = Path(data_dir)
    sources = root / "sources.json"
    if sources.is_file():  # several generated data sets shown as one (lungct.synth.merge_layouts)
        parts = read_json(sources).get("parts") or []
        return {"kind": "merged", "parts": [_describe_synth(p["synth"]) for p in parts]}
    synth = root / "synth.json"
    if synth.is_file():
        return _describe_synth(read_json(synth))
    uids = root / "seriesuids.csv"
    scans = None
    if uids.is_file():
        scans = sum(1 for line in uids.read_text().splitlines() if line.strip())
    return {"kind": "LUNA16 layout", "name": root.name, "scans": scans}


def _describe_synth(s: dict | None) -> dict[str, Any]:
    if not s:
        return {"kind": "unknown"}
    background = s.get("background")
    return {
        "kind": "synthetic",
        "seed": s.get("seed"),
        "size": "real background" if background else s.get("size"),
        "scans": s.get("n_scans"),
        "nodules": s.get("n_annotations"),
        "generator_version": s.get("generator_version"),
        "background": Path(background).name if background else None,
    }


class UnfinishedModelError(LungCTError):
    """A model folder whose training has not ended: its manifest carries no seal."""


# ----------------------------------------------------------------------------------------------
# The trained plan
# ----------------------------------------------------------------------------------------------

_ABSENT = object()


def canonical_plan(plan: Mapping[str, Any]) -> dict:
    """A plan's fields as plain JSON (tuples as lists), without its format version.

    The format version says how the file is spelled, not what the weights were trained with,
    so it is no part of the digest.
    """
    data = json.loads(json.dumps(dict(plan)))
    data.pop(PLAN_FORMAT_KEY, None)
    return data


def plan_digest(plan: Mapping[str, Any]) -> str:
    """SHA-256 of a plan's canonical JSON (sorted keys, no spaces): the same for the same plan
    however its file is indented or ordered."""
    text = json.dumps(canonical_plan(plan), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def plan_changes(trained: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The fields whose values differ, sorted; numbers compare by value (400 equals 400.0)."""
    a, b = canonical_plan(trained), canonical_plan(current)
    return sorted(k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT))


def _short_json(value: Any, limit: int = 40) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_plan_changes(
    trained: Mapping[str, Any], current: Mapping[str, Any], limit: int = 3
) -> str:
    """``hu_window [-1000,400] -> [-1200,400], ...``: the first ``limit`` changed fields."""
    a, b = canonical_plan(trained), canonical_plan(current)
    keys = plan_changes(a, b)
    parts = [
        f"{k} {_short_json(a.get(k, _ABSENT))} -> {_short_json(b.get(k, _ABSENT))}"
        for k in keys[:limit]
    ]
    if len(keys) > limit:
        parts.append(f"{len(keys) - limit} more")
    return ", ".join(parts)


def check_plan_unchanged(
    plan_path: str | os.PathLike,
    trained_plan: Mapping[str, Any] | None,
    trained_digest: str | None = None,
    when: str = "after training",
) -> None:
    """Refuse a ``plan.json`` that is not the plan the weights were trained with.

    The plan decides how a scan is resampled, windowed and cut before it meets the weights:
    an edited HU window or spacing would feed the network inputs it never saw, silently.

    Raises:
        LungCTError: naming ``plan_path`` and the changed fields.
    """
    plan_path = Path(plan_path)
    current = read_json(plan_path, "the model's plan file is missing")
    if not isinstance(current, dict):
        raise LungCTError(plan_path, "a plan must be a JSON object")
    digest = trained_digest or (plan_digest(trained_plan) if trained_plan is not None else None)
    if digest is None or plan_digest(current) == digest:
        return
    if isinstance(trained_plan, Mapping):
        changes = describe_plan_changes(trained_plan, current)
        if not changes:  # the same values spelled otherwise (400 for 400.0)
            return
        raise LungCTError(
            plan_path,
            f"edited {when} ({changes}): the weights were trained with the plan recorded in "
            "manifest.json (trained_plan); restore that plan or train again",
        )
    raise LungCTError(
        plan_path,
        f"edited {when} (its digest is not the trained plan's): restore it or train again",
    )


# ----------------------------------------------------------------------------------------------
# Sealing and verifying
# ----------------------------------------------------------------------------------------------


def seal_model_dir(
    model_dir: str | os.PathLike,
    stage: str,
    train_seconds: float,
    data_dir: str | os.PathLike | None = None,
    seeds: dict[str, int] | None = None,
    steps: int | None = None,
    extra: dict[str, Any] | None = None,
    plan: Mapping[str, Any] | None = None,
) -> dict:
    """Add the seal (format, checksums, trained plan, provenance) to a finished model folder.

    Call it last, once every file of the folder is written: the seal is the folder's done
    marker, and any later change to a sealed file makes :func:`verify_model_dir` refuse it.

    Args:
        model_dir: the model folder; its ``manifest.json`` must exist.
        stage: ``unet``, ``centernet``, ``fpr``, ``gan`` or ``malignancy``.
        train_seconds: wall time of training, all sittings together.
        data_dir: the training data folder (described, not linked).
        seeds: the random seeds that made the model (data, sampler, initialisation).
        steps: optimiser steps (or epochs, as ``extra`` says) done.
        extra: stage-specific provenance (epochs, budget, stop reason).
        plan: the plan's fields as the trainer used them. Without it a folder sealed before
            keeps the plan it recorded, and a folder never sealed records its ``plan.json``.

    Raises:
        LungCTError: ``plan.json`` differs from the trained plan (a folder cannot be sealed
            again to cover an edited plan).

    Returns:
        The sealed manifest.
    """
    root = Path(model_dir)
    path = root / MANIFEST_NAME
    manifest = read_json(path, "no manifest.json to seal", missing_where=root)
    if not isinstance(manifest, dict):
        raise LungCTError(path, "a manifest must be a JSON object")
    plan_path = root / PLAN_NAME
    trained: dict | None = None
    if plan is not None:
        trained = canonical_plan(plan)
    elif isinstance(manifest.get("trained_plan"), dict):
        trained = manifest["trained_plan"]
    elif plan_path.is_file():
        found = read_json(plan_path)
        trained = canonical_plan(found) if isinstance(found, dict) else None
    if trained is not None and plan_path.is_file():
        check_plan_unchanged(plan_path, trained, when="after training; not sealing")
    manifest = strip_seal(manifest)
    manifest["format"] = MANIFEST_FORMAT
    manifest["files"] = {name: file_sha256(root / name) for name in sealed_files(root)}
    if trained is not None:
        manifest["plan_sha256"] = plan_digest(trained)
        manifest["trained_plan"] = trained
    manifest["provenance"] = {
        "stage": stage,
        "data": describe_data(data_dir),
        "seeds": dict(seeds or {}),
        "steps": steps,
        "train_seconds": round(float(train_seconds), 1),
        "hardware": hardware(),
        "versions": package_versions(),
        "sealed": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    write_json_atomic(path, manifest)
    return manifest


def is_sealed(manifest: Mapping[str, Any]) -> bool:
    """Whether a manifest carries the seal, i.e. its training ended."""
    return manifest.get("format") is not None and "files" in manifest


def check_manifest_shape(path: str | os.PathLike, manifest: Any) -> dict:
    """Refuse a manifest that is valid JSON of the wrong shape, naming the key and its type.

    Returns:
        The manifest (a dict).
    """
    if not isinstance(manifest, dict):
        raise LungCTError(path, f"a manifest must be a JSON object, not {_json_kind(manifest)}")
    check_value_types(MANIFEST_TYPES, manifest, path)
    provenance = manifest.get("provenance")
    if provenance is not None:
        check_value_types(PROVENANCE_TYPES, provenance, path, prefix="provenance.")
        parts = (provenance.get("data") or {}).get("parts")
        if parts is not None:
            check_value_types({"parts": list[dict]}, {"parts": parts}, path, "provenance.data.")
    return manifest


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'AEIOM' else 'a'} {noun}"  # a U-Net, an MGI-CNN


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return "a number"


def verify_model_dir(
    model_dir: str | os.PathLike,
    check_files: bool = True,
    allow_unfinished: bool = False,
    stage: str | None = None,
) -> dict:
    """Check a model folder's seal before anything in it is loaded.

    Args:
        model_dir: the model folder.
        check_files: compare every sealed file with its checksum (off for a checkpoint, whose
            folder may go on training).
        allow_unfinished: accept a folder whose training has not ended (no seal): its last
            saved weights, with nothing to check them against.
        stage: ``unet``, ``centernet``, ``fpr``, ``gan`` or ``malignancy``: refuse a sealed folder of another
            stage.

    Raises:
        UnfinishedModelError: no seal and ``allow_unfinished`` is false.
        LungCTError: no manifest, a manifest of the wrong shape, a manifest format newer than
            this version reads, another stage's folder, a ``plan.json`` edited after training,
            a sealed file missing or changed.

    Returns:
        The manifest, seal included.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise LungCTError(root, "model folder does not exist")
    path = root / MANIFEST_NAME
    manifest = read_json(
        path,
        "no manifest.json: this is not a finished model folder (its checksums and training "
        "data are unknown)",
        missing_where=root,
    )
    if not isinstance(manifest, dict):
        raise LungCTError(path, f"a manifest must be a JSON object, not {_json_kind(manifest)}")
    if not is_sealed(manifest):
        check_manifest_shape(path, manifest)
        if allow_unfinished:
            return manifest
        raise UnfinishedModelError(
            path,
            "the manifest is not sealed: training did not finish (continue it with `train "
            "--resume`, or pass --allow-unfinished to use its last saved weights) or an older "
            "version wrote the folder",
        )
    check_format_version(manifest["format"], MANIFEST_FORMAT, path, "manifest format")
    check_manifest_shape(path, manifest)
    files = manifest["files"]
    if not files:
        raise LungCTError(path, "the manifest's file list is empty")
    found = (manifest.get("provenance") or {}).get("stage")
    wanted = STAGE_NAMES.get(stage or "", stage)
    if stage is not None and found is not None and found != stage:
        raise LungCTError(
            root,
            f"is {_a(STAGE_NAMES.get(found, found))} model folder, not {_a(wanted)} one: pass "
            f"the {wanted} stage's folder",
        )
    if "plan_sha256" in manifest:
        check_plan_unchanged(
            root / PLAN_NAME, manifest.get("trained_plan"), manifest["plan_sha256"]
        )
    for name in files:
        if Path(name).name != name or name in (".", ".."):
            raise LungCTError(path, f"sealed file name {name!r} is not a plain file name")
    if check_files:
        for name, expected in sorted(files.items()):
            target = root / name
            if not target.is_file():
                raise LungCTError(target, "sealed model file is missing")
            if file_sha256(target) != expected:
                if name == PLAN_NAME:
                    raise LungCTError(
                        target,
                        "edited after training (sha256 mismatch): the weights were trained with "
                        "another plan; restore it or train the model again",
                    )
                raise LungCTError(
                    target,
                    "file changed since the model was sealed (sha256 mismatch): the download "
                    "is corrupt or the file was edited; restore it or train the model again",
                )
    return manifest


# ----------------------------------------------------------------------------------------------
# Keras model files
# ----------------------------------------------------------------------------------------------


def keras_file_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a just-written ``.keras`` file (not a whole archive, no config or
    weights), or None: the check an atomic save runs before it renames the file in place."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if archive.testzip() is not None:
                return "was not written whole (a damaged member in the .keras archive)"
    except (zipfile.BadZipFile, OSError):
        return "was not written whole (not a complete .keras archive)"
    if "config.json" not in names or not any(n.endswith(".weights.h5") for n in names):
        return "was not written whole (the .keras archive lacks its config or weights)"
    return None


_NOT_KERAS = "cannot be loaded as a Keras model"


def read_keras_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of a ``.keras`` archive, read without Keras (nothing is built).

    Raises:
        LungCTError: no such file, not a ``.keras`` archive, a config that is not a JSON object.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            text = archive.read("config.json")
    except FileNotFoundError:
        raise LungCTError(path, "model file not found") from None
    except KeyError:
        raise LungCTError(path, f"{_NOT_KERAS} (the archive has no config.json)") from None
    except (zipfile.BadZipFile, OSError, ValueError):
        raise LungCTError(path, f"{_NOT_KERAS} (not a .keras zip archive)") from None
    try:
        config = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise LungCTError(path, f"{_NOT_KERAS} (its config.json is not JSON)") from None
    if not isinstance(config, dict):
        raise LungCTError(path, f"{_NOT_KERAS} (its config.json is not an object)")
    return config


def _keras_objects(value: Any) -> Iterator[dict]:
    """Every serialized Keras object (a dict with ``class_name``) in a config, depth first."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _trusted(name: Any, separator: str) -> bool:
    if not isinstance(name, str) or not name:
        return False
    return name.split(separator, 1)[0] in TRUSTED_PACKAGES


def model_class(config: Mapping[str, Any]) -> str:
    """A model config's class as Keras registered it (``unet_candidates>UNet2D``)."""
    return str(config.get("registered_name") or config.get("class_name") or "?")


def check_keras_config(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    classes: Sequence[str] | None = None,
    what: str = "a model of this suite",
) -> None:
    """Refuse a model config that names foreign code, a Lambda layer or another network.

    Safe mode would refuse most of it too, but only after importing what the file names, and
    with a message holding the whole config; here nothing is imported and the line is short.

    Args:
        path: the file, for the message.
        config: its ``config.json``.
        classes: the registered names the top-level model may have (None: any).
        what: the model wanted, in words, for the message.

    Raises:
        LungCTError: naming ``path`` and the class.
    """
    for obj in _keras_objects(config):
        name = obj.get("class_name")
        if name in CODE_CLASSES:
            raise LungCTError(
                path,
                "holds a Lambda layer (Python code inside the file): refused, models load in "
                "Keras safe mode",
            )
        module, registered = obj.get("module"), obj.get("registered_name")
        if module is not None and not _trusted(module, "."):
            raise LungCTError(
                path,
                f"names the class {name!r} of the module {module!r}, which is neither Keras "
                "nor this suite: refused",
            )
        if isinstance(registered, str) and ">" in registered and not _trusted(registered, ">"):
            raise LungCTError(
                path,
                f"names the class {registered!r}, which is neither Keras nor this suite: refused",
            )
    found = model_class(config)
    if classes is not None and found not in classes:
        raise LungCTError(
            path,
            f"holds a {found.split('>')[-1]!r} network, not {what}: it belongs to another "
            "stage or program",
        )


def check_architecture(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    expected: Mapping[str, Any],
    plan_path: str | os.PathLike,
    renamed_keys: Mapping[str, str] | None = None,
) -> None:
    """Refuse weights whose network settings are not those the plan builds.

    ``expected`` holds the settings the plan gives the network's constructor (filters, input
    channels, patch shape...); they are compared with the file's config before anything is
    built, so a plan that belongs to other weights is named instead of failing in Keras.
    ``renamed_keys`` maps a config key that files of earlier versions wrote to its new name
    (``{"integration": "merge"}``), so those files are compared under the new name.

    Raises:
        LungCTError: naming ``path``, the plan and the first differing settings.
    """
    found = config.get("config")
    if not isinstance(found, dict):
        raise LungCTError(path, f"{_NOT_KERAS} (its model config is not an object)")
    if renamed_keys:
        found = {renamed_keys.get(k, k): v for k, v in found.items()}
    want = json.loads(json.dumps(dict(expected)))
    differ = [k for k in want if found.get(k, _ABSENT) != want[k]]
    if differ:
        shown = ", ".join(
            f"{k} {_short_json(found.get(k, _ABSENT))} (plan {_short_json(want[k])})"
            for k in differ[:3]
        )
        raise LungCTError(
            path,
            f"does not fit the plan in {Path(plan_path).name}: {shown}; the plan belongs to "
            "other weights",
        )


def load_keras_model(
    path: str | os.PathLike,
    classes: Sequence[str] | None = None,
    what: str = "a model of this suite",
    architecture: Mapping[str, Any] | None = None,
    plan_path: str | os.PathLike | None = None,
    compile: bool = False,
    renamed_keys: Mapping[str, str] | None = None,
) -> Any:
    """Load a ``.keras`` file in Keras safe mode after checking its config.

    Args:
        path: the file.
        classes: registered names the model may have (:func:`check_keras_config`).
        what: the model wanted, in words.
        architecture: the settings the plan gives the network (:func:`check_architecture`).
        plan_path: the plan, for the message.
        compile: restore the optimiser and loss too (to resume training).
        renamed_keys: config keys of earlier versions and their new names
            (:func:`check_architecture`).

    Raises:
        LungCTError: one line naming ``path``: not a model file, foreign code, another
            network, weights that do not fit the plan, or Keras's own refusal.
    """
    config = read_keras_config(path)
    check_keras_config(path, config, classes, what)
    if architecture is not None:
        check_architecture(path, config, architecture, plan_path or PLAN_NAME, renamed_keys)
    return keras_load_safe(path, compile=compile)


def keras_load_safe(path: str | os.PathLike, compile: bool = False) -> Any:
    """``keras.saving.load_model(path, safe_mode=True)`` with Keras's refusal as one line."""
    import keras

    try:
        return keras.saving.load_model(path, safe_mode=True, compile=compile)
    except Exception as exc:  # Keras raises many types for a broken or refused file
        raise LungCTError(path, f"{_NOT_KERAS} in safe mode ({_first_sentence(exc)})") from None


def _first_sentence(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    cut = text.find(". ")
    if 0 < cut < limit:
        return text[: cut + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_demo_grade(manifest: dict) -> bool:
    """Whether a sealed manifest shows a demo-grade training: minutes, or small synthetic data."""
    prov = manifest.get("provenance") or {}
    data = prov.get("data") or {}
    seconds = prov.get("train_seconds")
    short = isinstance(seconds, (int, float)) and seconds < DEMO_GRADE_SECONDS
    parts = data.get("parts") if data.get("kind") == "merged" else [data]
    small = any(p.get("kind") == "synthetic" and p.get("size") == "small" for p in parts or [])
    return bool(short or small)
