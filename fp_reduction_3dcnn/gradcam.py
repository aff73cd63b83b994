"""Grad-CAM for one candidate: where in its patches the network looked.

The heat map is the ReLU of the last convolutional block's feature maps weighted by the mean
gradient of the logit (Selvaraju et al., ICCV 2017), resized to each cut patch (the MGI-CNN's
three scales, the single-patch networks' one) and drawn over their axial, coronal and sagittal
centre slices. The network sees every scale on
the same ``input_size`` grid, so the same map is drawn over each scale's own extent. In 2.5-D
the slices are channels, so the map has no z resolution (constant along z).

Gradients need the backend's autodiff: TensorFlow (``GradientTape``) and torch
(``torch.autograd``) are supported; the model code itself stays backend-agnostic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from scipy import ndimage

from fp_reduction_3dcnn.data import PatchCutter
from fp_reduction_3dcnn.model import GRADCAM_LAYER, LOGIT_LAYER
from fp_reduction_3dcnn.predict import TrainedModel
from lungct.cache import CachedScan, ScanCache
from lungct.errors import LungCTError
from lungct.fileio import atomic_path, new_figure
from lungct.preprocess import WINDOWS, resample_scan


def _features_and_gradients(model: keras.Model, inputs: Sequence[np.ndarray]):
    # Each network names its last convolutional output; the MGI-CNN's is GRADCAM_LAYER.
    features = model.get_layer(getattr(model, "gradcam_layer", GRADCAM_LAYER)).output
    sub = keras.Model(model.inputs, [features, model.get_layer(LOGIT_LAYER).output])
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        xs = [tf.convert_to_tensor(x) for x in inputs]
        with tf.GradientTape() as tape:
            features, logit = sub(xs, training=False)
        grads = tape.gradient(logit, features)
        return features.numpy(), grads.numpy(), logit.numpy()
    if backend == "torch":
        import torch

        xs = [torch.as_tensor(np.asarray(x)) for x in inputs]
        features, logit = sub(xs, training=False)
        (grads,) = torch.autograd.grad(logit.sum(), features)
        return (
            features.detach().cpu().numpy(),
            grads.detach().cpu().numpy(),
            logit.detach().cpu().numpy(),
        )
    raise LungCTError(None, f"Grad-CAM needs the tensorflow or torch backend, not {backend!r}")


def grad_cam(model: keras.Model, inputs: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """Grad-CAM map of one sample.

    Args:
        model: an :class:`~fp_reduction_3dcnn.model.MGICNN` (or another network of the
            plans: :class:`~fp_reduction_3dcnn.resnet3d.ResNet3D`,
            :class:`~fp_reduction_3dcnn.cnn3d.CNN3D`).
        inputs: the scales (three for the MGI-CNN, one patch for the others), each
            ``(1, y, x, z)``.

    Returns:
        ``(cam, probability)``: ``cam`` in [0, 1], ``(y, x)`` for 2.5-D models and
        ``(y, x, z)`` for 3-D ones, on the last conv block's grid.
    """
    features, grads, logit = _features_and_gradients(model, inputs)
    spatial = tuple(range(1, features.ndim - 1))
    weights = grads.mean(axis=spatial, keepdims=True)
    cam = np.maximum((weights * features).sum(axis=-1)[0], 0.0)
    peak = cam.max()
    cam = cam / peak if peak > 0 else cam
    probability = float(1.0 / (1.0 + np.exp(-float(np.ravel(logit)[0]))))
    return cam.astype(np.float32), probability


def cam_to_patch(cam: np.ndarray, shape_zyx: Sequence[int]) -> np.ndarray:
    """Resize a ``(y, x)`` or ``(y, x, z)`` map to a patch ``(z, y, x)`` (linear, centres aligned)."""
    cam_zyx = cam[None] if cam.ndim == 2 else np.transpose(cam, (2, 0, 1))
    factors = [t / s for t, s in zip(shape_zyx, cam_zyx.shape, strict=True)]
    out = ndimage.zoom(cam_zyx, factors, order=1, mode="nearest", grid_mode=True)
    return np.clip(out, 0.0, 1.0)


def open_scan_for_cam(path: str | os.PathLike, spacing_xyz: Sequence[float]) -> CachedScan:
    """A cache entry folder (``CACHE/<uid>``) or a scan file resampled world-aligned."""
    path = Path(path)
    if path.is_dir() and (path / "meta.json").is_file():
        return ScanCache(path.parent).open(path.name)
    from lungct.io import read_scan

    scan = resample_scan(read_scan(path), tuple(spacing_xyz), align_to_world=True)
    return CachedScan(scan.seriesuid, scan.array, None, scan.geometry, {})


def gradcam_figure(
    trained: TrainedModel,
    scan: CachedScan,
    world_xyz: Sequence[float],
    out_png: str | os.PathLike,
    window: tuple[float, float] = WINDOWS["lung"],
) -> dict:
    """Write a PNG: for each scale or patch (rows), axial/coronal/sagittal slices with the
    Grad-CAM overlay.

    A colour bar on the right gives the overlay's scale (0..1, relative to the map's peak).

    Returns:
        ``{"probability": p, "out": path}``.
    """
    plan = trained.plan
    cutter = PatchCutter(plan, ScanCache(Path(".")))
    centre = np.asarray(world_xyz, dtype=np.float64).reshape(1, 3)
    inputs = cutter.cut_scan(scan, centre)
    cam, probability = grad_cam(trained.model, inputs)
    patches = cutter.cut_hu(scan, centre[0])
    sx, sy, sz = plan.cut_spacing
    rows = len(plan.patch_sizes)
    fig = new_figure((10.5, 3.5 * rows + (0.6 if rows == 1 else 0.0)))
    axes = fig.subplots(rows, 3, squeeze=False)
    for row, (patch, size) in enumerate(zip(patches, plan.patch_sizes, strict=True)):
        heat = cam_to_patch(cam, patch.shape)
        nz, ny, nx = patch.shape
        zc, yc, xc = nz // 2, ny // 2, nx // 2
        views = [
            ("axial", patch[zc], heat[zc], "upper", sy / sx, (xc, yc)),
            ("coronal", patch[:, yc, :], heat[:, yc, :], "lower", sz / sx, (xc, zc)),
            ("sagittal", patch[:, :, xc], heat[:, :, xc], "lower", sz / sy, (yc, zc)),
        ]
        for col, (title, image, overlay, origin, aspect, mark) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(
                image,
                cmap="gray",
                vmin=window[0],
                vmax=window[1],
                origin=origin,
                aspect=aspect,
                interpolation="nearest",
            )
            ax.imshow(
                overlay,
                cmap="jet",
                alpha=0.3,
                vmin=0,
                vmax=1,
                origin=origin,
                aspect=aspect,
                interpolation="bilinear",
            )
            ax.plot(*mark, marker="+", color="white", markersize=8, markeredgewidth=0.8)
            what = f"scale {row + 1}" if rows > 1 else "patch"
            ax.set_title(f"{what} ({size[0]}x{size[1]}x{size[2]}) {title}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    x, y, z = (float(v) for v in centre[0])
    note = " (2.5-D: map constant along z)" if plan.conv == "2.5d" else ""
    network = f"{plan.variant}/{plan.conv}" if plan.network == "mgicnn" else plan.network
    fig.suptitle(
        f"{scan.seriesuid}\nworld ({x:.1f}, {y:.1f}, {z:.1f}) mm   p(nodule) = {probability:.3f}"
        f"   {network}{note}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    # The overlay's scale: the map is relative (1 = its peak), drawn at 30% opacity.
    bar = fig.add_axes((0.935, 0.25, 0.015, 0.5))
    fig.colorbar(
        ScalarMappable(norm=Normalize(0, 1), cmap="jet"),
        cax=bar,
        label="Grad-CAM (relative to its peak; overlay at 30% opacity)",
    )
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    return {"probability": round(probability, 6), "out": str(out_png)}
