"""``python -m integration export``: the trained networks of a models folder, for deployment.

A models folder (``integration demo`` writes one)::

    MODELS/unet/model.keras + plan.json    the candidate U-Net
    MODELS/fpr/model.keras + plan.json     the MGI-CNN (optional; fpr2/ ... an ensemble's
                                           further members, exported alike: average them)
    MODELS/malignancy/model.keras + plan.json  the malignancy CNN (optional)
    MODELS/pipeline.json                   report threshold, TTA, candidate_weight (optional)

becomes::

    OUT/unet/saved_model/   (or OUT/unet/model.onnx)   the U-Net's forward pass
    OUT/unet/plan.json      spacing, windowing, window size, post-processing: what to feed it
    OUT/fpr/saved_model/    (or OUT/fpr/model.onnx)    the MGI-CNN's forward pass
    OUT/fpr/plan.json       patch sizes, cut spacing, HU window (+ manifest.json: its folds)
    OUT/malignancy/...      the malignancy CNN, as the MGI-CNN (when the set has one)
    OUT/pipeline.json       copied when present
    OUT/export_manifest.json  format, versions, and every model's input / output names,
                              shapes and dtypes (and, for an ensemble, ``fpr_ensemble``:
                              its members, whose outputs are to be averaged; for a set
                              whose ``pipeline.json`` has a ``candidate_weight`` above 0,
                              ``score``: how the U-Net's candidate probability, the
                              smoothed peak of its map in the candidate's blob after
                              post-processing, is mixed with theirs)

The models are read in Keras safe mode (no arbitrary code). ``saved_model`` is Keras 3's
``model.export(path, format="tf_saved_model")``: load it with ``tf.saved_model.load`` and call
``.serve(...)`` or the ``serving_default`` signature; the network code is no longer needed.
``onnx`` is ``model.export(path, format="onnx")``, which needs the ``tf2onnx`` and ``onnx``
packages (``requirements.txt`` pins versions known to work with its TensorFlow); run it with
``onnxruntime``.

The U-Net takes ``(batch, y, x, channels)`` slabs (2-D) or ``(batch, z, y, x, 1)`` blocks
(3-D) of any size that is a multiple of ``2 ** levels``; the MGI-CNN takes three patches
``(batch, y, x, z)`` (wide, middle, narrow scale, each resized to the plan's input size) and
returns the nodule probability ``(batch, 1)``; the malignancy CNN takes ``(batch, y, x, z)``
cubes of the plan's ``patch_mm`` voxels at 1 mm and returns ``malignancy`` (probability) and
``rating`` (the LIDC 1-5 rating as ``(rating - 3) / 2``).
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import os
import platform
import shutil
from pathlib import Path
from typing import Any

from lungct.errors import LungCTError
from lungct.fileio import write_json_atomic, write_text_atomic

FORMATS = ("saved_model", "onnx")
ONNX_PACKAGES = ("tf2onnx", "onnx")
ONNX_HINT = "pip install tf2onnx==1.17.0 onnx==1.23.2 (and onnxruntime==1.31.1 to run it)"


def missing_onnx_packages() -> list[str]:
    """The packages ``--format onnx`` needs that are not installed."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def _tensor_info(tensors: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": getattr(t, "name", None),
            "shape": [None if d is None else int(d) for d in t.shape],
            "dtype": str(getattr(t.dtype, "name", t.dtype)),
        }
        for t in tensors
    ]


def load_fpr_model(fpr_dir: Path) -> tuple[Any, Any]:
    """``model.keras`` (safe mode) and ``plan.json`` of an MGI-CNN model folder.

    Raises:
        LungCTError: missing or unreadable files.
    """
    import fp_reduction_3dcnn.model  # noqa: F401  (registers the custom classes)
    from fp_reduction_3dcnn.config import FPRPlan
    from fp_reduction_3dcnn.train import load_keras

    plan = FPRPlan.load(fpr_dir / "plan.json")
    weights = fpr_dir / "model.keras"
    if not weights.is_file():
        raise LungCTError(weights, "model file not found (has training finished?)")
    return load_keras(weights, compile=False), plan


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _example_inputs(model: Any, plan: Any) -> Any:
    """One zero batch the model accepts: the U-Net's extraction window, the MGI-CNN's patches."""
    import numpy as np

    from fp_reduction_3dcnn.config import FPRPlan
    from fp_reduction_3dcnn.malignancy import MalignancyPlan

    if isinstance(plan, FPRPlan):
        return [np.zeros((1, *plan.input_shape), np.float32) for _ in model.inputs]
    if isinstance(plan, MalignancyPlan):
        return np.zeros((1, *plan.input_shape), np.float32)
    z, y, x = plan.window_size
    shape = (1, y, x, plan.input_channels) if plan.dims == "2d" else (1, z, y, x, 1)
    return np.zeros(shape, np.float32)


def _export_one(model: Any, plan: Any, target: Path, fmt: str, what: str) -> dict[str, Any]:
    """Export one model to ``target`` (a folder or a file), replacing an earlier export."""
    import warnings

    import keras

    # A model loaded from a file has not been called yet; the ONNX exporter wants it called
    # (the exported signature keeps the batch and, for the U-Net, the spatial sizes dynamic).
    model(_example_inputs(model, plan), training=False)

    tmp = target.with_name(f".partial-{target.name}")  # keeps the suffix (.onnx)
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # Keras' tf2onnx shim probes ``np.object``, which NumPy 2 warns about.
            warnings.simplefilter("ignore", FutureWarning)
            if fmt == "saved_model":
                model.export(str(tmp), format="tf_saved_model", verbose=False)
            else:
                model.export(str(tmp), format="onnx", verbose=False)
    except Exception as exc:  # TF / tf2onnx raise many types
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
        raise LungCTError(target, f"{fmt} export of the {what} failed ({_one_line(exc)})") from None
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(tmp, target)
    info: dict[str, Any] = {
        "path": str(target.relative_to(target.parent.parent)),
        "keras_inputs": _tensor_info(model.inputs),
        "keras_outputs": _tensor_info(model.outputs),
        "keras_version": keras.__version__,
    }
    info.update(_served_signature(target, fmt))
    return info


def _served_signature(target: Path, fmt: str) -> dict[str, Any]:
    """Input / output names and shapes as the exported artifact declares them."""
    if fmt == "saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(target))
        signature = loaded.signatures["serving_default"]
        inputs = signature.structured_input_signature[1]
        outputs = signature.structured_outputs
        return {
            "signature": "serving_default",
            "inputs": [
                {"name": k, "shape": v.shape.as_list(), "dtype": v.dtype.name}
                for k, v in sorted(inputs.items())
            ],
            "outputs": [
                {"name": k, "shape": v.shape.as_list(), "dtype": v.dtype.name}
                for k, v in sorted(outputs.items())
            ],
        }
    import onnx

    graph = onnx.load(str(target)).graph

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            dims = v.type.tensor_type.shape.dim
            out.append(
                {
                    "name": v.name,
                    "shape": [d.dim_value if d.HasField("dim_value") else None for d in dims],
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(
                        v.type.tensor_type.elem_type
                    ).name,
                }
            )
        return out

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def _fpr_stages(models: Path) -> list[str]:
    """The false-positive reducers to export: those the model set lists, or, in a folder
    without ``modelset.json``, ``fpr/`` alone."""
    from integration.modelset import MODELSET_FILE, fpr_stages, read_model_set

    if (models / MODELSET_FILE).is_file():
        return fpr_stages(read_model_set(models).stages)
    return ["fpr"] if (models / "fpr").is_dir() else []


def export_models(
    models_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "saved_model"
) -> dict[str, Any]:
    """Export the U-Net and (when present) the MGI-CNN and the malignancy CNN of a models
    folder; return the manifest.

    Raises:
        LungCTError: an unknown format, a missing or broken models folder, missing ONNX
            packages, or a failed export.
    """
    if fmt not in FORMATS:
        raise LungCTError(None, f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    models, out = Path(models_dir), Path(out_dir)
    if not models.is_dir():
        raise LungCTError(models, "models folder does not exist")
    if not (models / "unet").is_dir():
        raise LungCTError(models, "has no unet/ model folder (see `integration demo`)")
    if fmt == "onnx":
        missing = missing_onnx_packages()
        if missing:
            raise LungCTError(
                None,
                f"ONNX export needs the package{'s' if len(missing) > 1 else ''} "
                f"{' and '.join(missing)}, not installed ({ONNX_HINT})",
            )
    if out.resolve() == models.resolve():
        raise LungCTError(out, "export into another folder than the models folder")
    from unet_candidates.extract import load_unet

    suffix = "saved_model" if fmt == "saved_model" else "model.onnx"
    unet_model, unet_plan = load_unet(models / "unet")
    exported: dict[str, Any] = {}
    exported["unet"] = _export_one(unet_model, unet_plan, out / "unet" / suffix, fmt, "U-Net")
    write_text_atomic(out / "unet" / "plan.json", (models / "unet" / "plan.json").read_text())
    exported["unet"]["plan"] = "unet/plan.json"
    members = _fpr_stages(models)
    for stage in members:  # an ensemble's members too
        fpr_model, fpr_plan = load_fpr_model(models / stage)
        exported[stage] = _export_one(fpr_model, fpr_plan, out / stage / suffix, fmt, "MGI-CNN")
        for name in ("plan.json", "manifest.json"):
            if (models / stage / name).is_file():
                write_text_atomic(out / stage / name, (models / stage / name).read_text())
        exported[stage]["plan"] = f"{stage}/plan.json"
    if (models / "malignancy").is_dir():
        from fp_reduction_3dcnn.malignancy import open_malignancy_model

        opened = open_malignancy_model(models / "malignancy")
        exported["malignancy"] = _export_one(
            opened.model, opened.plan, out / "malignancy" / suffix, fmt, "malignancy CNN"
        )
        for name in ("plan.json", "manifest.json"):
            source = models / "malignancy" / name
            write_text_atomic(out / "malignancy" / name, source.read_text())
        exported["malignancy"]["plan"] = "malignancy/plan.json"
    if (models / "pipeline.json").is_file():
        write_text_atomic(out / "pipeline.json", (models / "pipeline.json").read_text())
    manifest = {
        "format": fmt,
        "models_dir": str(models.resolve()),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": _versions(fmt),
        "models": exported,
    }
    if len(members) > 1:
        manifest["fpr_ensemble"] = {"members": members, "combine": "mean"}
    if members and (models / "pipeline.json").is_file():
        from integration.pipeline import PipelineConfig

        weight = PipelineConfig.load(models).candidate_weight
        if weight > 0:
            manifest["score"] = {
                "candidate_weight": weight,
                "rule": "candidate_weight * U-Net candidate probability (the smoothed peak of "
                "its probability map in the candidate's blob, after post-processing) + "
                "(1 - candidate_weight) * mean probability of the false-positive reducers",
            }
    write_json_atomic(out / "export_manifest.json", manifest)
    return manifest


def _versions(fmt: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["tensorflow", "keras", "numpy"] + (list(ONNX_PACKAGES) if fmt == "onnx" else [])
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
