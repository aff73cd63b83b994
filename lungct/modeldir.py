"""A trained model folder's seal: file checksums, format version and provenance.

Every stage writes ``manifest.json`` into its model folder while it trains (folds, series,
plan name; see each stage's trainer). When training ends, :func:`seal_model_dir` adds three
keys to it::

    "format": 1                      manifest format; a newer one is refused, not guessed at
    "files": {"model.keras": "<sha256>", "plan.json": "<sha256>", ...}
                                     every top-level file of the folder but the manifest
    "provenance": {...}              training data, seeds, steps, wall time, hardware, versions

Loading goes through :func:`verify_model_dir` before a weight is read: a folder without a
sealed manifest (training did not finish, or an old folder), a file that changed since (a
corrupted download, an edited weight file) or a manifest written by a newer version of the
suite stops with one line naming the file. ``checkpoints/`` and ``logs/`` are training state,
not the model, and are not sealed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic
from lungct.plans import check_format_version

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SEAL_KEYS = ("format", "files", "provenance")
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


def seal_model_dir(
    model_dir: str | os.PathLike,
    stage: str,
    train_seconds: float,
    data_dir: str | os.PathLike | None = None,
    seeds: dict[str, int] | None = None,
    steps: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Add the seal (format, file checksums, provenance) to a finished model folder.

    Call it last, once every file of the folder is written: any later change to a sealed file
    makes :func:`verify_model_dir` refuse the folder.

    Args:
        model_dir: the model folder; its ``manifest.json`` must exist.
        stage: ``unet``, ``fpr`` or ``gan``.
        train_seconds: wall time of training, all sittings together.
        data_dir: the training data folder (described, not linked).
        seeds: the random seeds that made the model (data, sampler, initialisation).
        steps: optimiser steps (or epochs, as ``extra`` says) done.
        extra: stage-specific provenance (epochs, budget, stop reason).

    Returns:
        The sealed manifest.
    """
    root = Path(model_dir)
    manifest = read_json(root / MANIFEST_NAME, "no manifest.json to seal", missing_where=root)
    manifest = strip_seal(manifest)
    manifest["format"] = MANIFEST_FORMAT
    manifest["files"] = {name: file_sha256(root / name) for name in sealed_files(root)}
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
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return manifest


def verify_model_dir(model_dir: str | os.PathLike, check_files: bool = True) -> dict:
    """Check a model folder's seal before anything in it is loaded.

    Raises:
        LungCTError: no manifest, an unsealed one (training did not finish), a manifest
            format newer than this version reads, a sealed file missing or changed.

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
        raise LungCTError(path, "a manifest must be a JSON object")
    fmt = manifest.get("format")
    if fmt is None or "files" not in manifest:
        raise LungCTError(
            path,
            "the manifest is not sealed: training did not finish (continue it with "
            "`train --resume`) or the folder was written by an older version (train it again)",
        )
    check_format_version(fmt, MANIFEST_FORMAT, path, "manifest format")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise LungCTError(path, "the manifest's file list is empty or malformed")
    if check_files:
        for name, expected in sorted(files.items()):
            target = root / name
            if Path(name).name != name:
                raise LungCTError(path, f"sealed file name {name!r} is not a plain file name")
            if not target.is_file():
                raise LungCTError(target, "sealed model file is missing")
            if file_sha256(target) != expected:
                raise LungCTError(
                    target,
                    "file changed since the model was sealed (sha256 mismatch): the download "
                    "is corrupt or the file was edited; restore it or train the model again",
                )
    return manifest


def is_demo_grade(manifest: dict) -> bool:
    """Whether a sealed manifest shows a demo-grade training: minutes, or small synthetic data."""
    prov = manifest.get("provenance") or {}
    data = prov.get("data") or {}
    seconds = prov.get("train_seconds")
    short = isinstance(seconds, (int, float)) and seconds < DEMO_GRADE_SECONDS
    parts = data.get("parts") if data.get("kind") == "merged" else [data]
    small = any(p.get("kind") == "synthetic" and p.get("size") == "small" for p in parts or [])
    return bool(short or small)
