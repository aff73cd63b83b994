"""Solutions to the exercises of lab 3, MGI-CNN false-positive reduction (``labs/03-mgi-cnn.ipynb``).

Try the exercises first. ``tests/test_labs.py`` checks these functions against the suite (the
patch cutter, the test-time augmentation and the parameter count of the network it builds), so
they stay right as the suite changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fp_reduction_3dcnn.config import FPRPlan
from lungct.geometry import Geometry

AIR_HU = -1024.0
"""What a patch holds where it leaves the scan."""


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` output voxels when ``n_in`` voxels are resized to
    ``n_out`` by nearest neighbour, with the two grids' outer edges aligned.

    Output voxel ``i`` covers ``[i, i + 1) * n_in / n_out`` of the input; its centre
    ``(i + 0.5) * n_in / n_out`` falls in input voxel ``floor`` of that.
    """
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def cut_scales_by_hand(
    volume: np.ndarray, geometry: Geometry, centre_xyz: Sequence[float], plan: FPRPlan
) -> list[np.ndarray]:
    """Exercise 1: the three network inputs of one candidate, ``(y, x, z)`` each, wide scale first.

    For a cache grid (1 mm, world-aligned, so equal to the plan's ``cut_spacing``) and nearest
    resizing: round the candidate's continuous voxel index to the nearest voxel; cut a block of
    ``size`` voxels per axis starting at ``centre - size // 2`` (air outside the volume); clip
    the HU to ``plan.hu_window`` and map it to 0..1; pick the voxels of ``nearest_indices``
    along each axis; and put z last.
    """
    centre = np.rint(geometry.world_to_voxel(centre_xyz)).astype(np.int64)  # (z, y, x)
    lo, hi = plan.hu_window
    out_zyx = tuple(reversed(plan.input_size))
    inputs = []
    for size_xyz in plan.patch_sizes:
        size = np.array(size_xyz[::-1])  # (z, y, x)
        start = centre - size // 2
        block = np.full(tuple(size), AIR_HU, dtype=np.float32)
        src_lo = np.maximum(start, 0)
        src_hi = np.minimum(start + size, volume.shape)
        if np.all(src_hi > src_lo):
            dst = tuple(slice(a - s, b - s) for a, b, s in zip(src_lo, src_hi, start, strict=True))
            src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))
            block[dst] = volume[src]
        x = (np.clip(block, lo, hi) - lo) / (hi - lo)
        iz, iy, ix = (nearest_indices(n, m) for n, m in zip(size, out_zyx, strict=True))
        x = x[iz][:, iy][:, :, ix]
        inputs.append(np.transpose(x, (1, 2, 0)).astype(np.float32))  # (z, y, x) -> (y, x, z)
    return inputs


def tta_by_hand(
    predict: Callable[[list[np.ndarray]], np.ndarray],
    inputs: Sequence[np.ndarray],
    flip_z: bool = False,
) -> np.ndarray:
    """Exercise 2: the mean of ``predict`` over the 8 axial symmetries (16 with ``flip_z``).

    The same symmetry is applied to all three scales. Inputs are ``(N, y, x, z)``, so the axial
    plane is axes 1 and 2: a quarter turn is ``np.rot90(x, k, axes=(1, 2))`` and a left-right
    flip reverses axis 2. The 8 symmetries of a square are the 4 turns, each with and without a
    flip; which way round flip and turn are combined does not matter for the mean, because the
    set of 8 is the same.

    It costs 8 (or 16) forward passes instead of one. The network was trained on patches
    turned and flipped in these ways, so it should give about the same score to each; where it
    does not, the mean is less noisy than any one of them.
    """
    total = np.zeros(len(inputs[0]))
    count = 0
    for z_flip in (False, True) if flip_z else (False,):
        for x_flip in (False, True):
            for k in range(4):
                moved = []
                for x in inputs:
                    if x_flip:
                        x = x[:, :, ::-1]
                    if z_flip:
                        x = x[:, :, :, ::-1]
                    moved.append(np.ascontiguousarray(np.rot90(x, k, axes=(1, 2))))
                total += np.asarray(predict(moved), dtype=np.float64).reshape(-1)
                count += 1
    return total / count


def conv_params(c_in: int, c_out: int, kernel: int = 3) -> int:
    """A 2-D convolution (``kernel x kernel``, with bias) and its batch norm (4 numbers per
    channel: scale, offset, and the running mean and variance that ``count_params`` counts
    too)."""
    return kernel * kernel * c_in * c_out + c_out + 4 * c_out


def merge_params(channels: int, n_inputs: int, merge: str) -> tuple[int, int]:
    """``(parameters, channels out)`` of the merge of ``n_inputs`` maps of ``channels`` each."""
    if merge == "sum":
        return 0, channels
    if merge == "concat":
        return 0, n_inputs * channels
    return n_inputs * channels * channels + channels, channels  # conv1x1: one matrix each, a bias


def mgi_params_by_hand(plan: FPRPlan) -> int:
    """Exercise 3: the number of parameters of the 2.5-D network a plan describes.

    The exercise asks for the ``mgi`` variant; this counts the other four as well.

    * A gradual stream: two convolutions on its first scale (the 6 slices are the channels),
      then the next scale's 6 channels concatenated and two more, then the third scale and two
      more, a pooling and two convolutions of ``stream_top_filters``.
    * ``mgi`` has two such streams, merged by ``plan.merge``; ``zoom_in`` / ``zoom_out`` one.
    * ``ri`` concatenates the three scales (18 channels) and runs one stream with nothing
      added on the way; ``lr`` gives each scale its own first pair, merges the three, then
      continues as ``ri``.
    * The head: a pooling, two convolutions of ``head_filters``, the flattened map (20 pixels
      pooled twice with 'same' padding: 5 x 5), the fully connected layers (each with a batch
      norm) and one output unit.

    With the paper's widths, the first fully connected layer alone (5 x 5 x 512 inputs to 1,024
    units: 13.1 million) holds more parameters than the paper's total of 9,472,000: that total
    cannot be reproduced from its list of layers.
    """
    if plan.conv != "2.5d":
        raise ValueError("this counts 2.5-D networks only")
    f1, f2, f3 = plan.stream_filters
    top = plan.stream_top_filters
    slices = plan.input_size[2]

    def stream(first_channels: int, added: int) -> int:
        """One stream from its first input; ``added`` channels join before stages 2 and 3."""
        n = conv_params(first_channels, f1) + conv_params(f1, f1)
        n += conv_params(f1 + added, f2) + conv_params(f2, f2)
        n += conv_params(f2 + added, f3) + conv_params(f3, f3)
        return n + conv_params(f3, top) + conv_params(top, top)

    if plan.variant == "mgi":
        merged, channels = merge_params(top, 2, plan.merge)
        total = 2 * stream(slices, slices) + merged
    elif plan.variant in ("zoom_in", "zoom_out"):
        total, channels = stream(slices, slices), top
    elif plan.variant == "ri":
        total, channels = stream(3 * slices, 0), top
    else:  # lr: a first pair per scale, merged, then the rest of a stream
        merged, c = merge_params(f1, 3, plan.merge)
        total = 3 * (conv_params(slices, f1) + conv_params(f1, f1)) + merged
        total += conv_params(c, f2) + conv_params(f2, f2)
        total += conv_params(f2, f3) + conv_params(f3, f3)
        total += conv_params(f3, top) + conv_params(top, top)
        channels = top

    head = plan.head_filters
    total += conv_params(channels, head) + conv_params(head, head)
    side_y, side_x = plan.input_size[1], plan.input_size[0]
    for _ in range(2):  # the stream's pooling and the head's, stride 2, 'same' padding
        side_y, side_x = -(-side_y // 2), -(-side_x // 2)
    width = side_y * side_x * head
    for units in plan.dense_units:
        total += width * units + units + 4 * units  # dense with bias, and its batch norm
        width = units
    return int(total + width + 1)  # the output unit
