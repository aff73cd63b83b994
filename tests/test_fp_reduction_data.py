"""Candidates, labels, folds, patch cutting, balanced sampling and test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from fp_reduction_3dcnn.config import get_plan
from fp_reduction_3dcnn.data import (
    PatchCutter,
    excluded_rows,
    hit_labels,
    load_candidates,
    resize_patches,
    rows_in_folds,
    series_folds,
)
from fp_reduction_3dcnn.sampler import BalancedBatchSampler, validation_rows
from fp_reduction_3dcnn.symmetries import (
    AXIAL_SYMMETRIES,
    VOLUME_SYMMETRIES,
    apply_symmetry,
    tta_predict,
)
from fp_reduction_3dcnn.testing import make_tiny_dataset, write_cache_entry
from lungct.cache import ScanCache
from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.tables import AnnotationTable, CandidateTable, folds_from_layout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("fpr_data"), n_scans=4, write_mhd=True)


def test_hit_rule_is_strict_inside_radius():
    ann = AnnotationTable.from_rows([("a", 0, 0, 0, 10.0), ("b", 50, 50, 50, 4.0)])
    table = CandidateTable(
        ["a", "b", "c"],
        [0, 0, 0, 1, 1, 2],
        [[4.99, 0, 0], [5.0, 0, 0], [0, 3, 3], [51, 50, 50], [50, 50, 48], [0, 0, 0]],
    )
    # squared distance < (d/2)^2: 4.99 hits, exactly 5 does not; other series never count.
    assert hit_labels(table, ann).tolist() == [1, 0, 1, 1, 0, 0]


def test_unlabelled_candidates_need_annotations(tmp_path, tiny):
    path = tmp_path / "unet.csv"
    path.write_text("seriesuid,coordX,coordY,coordZ,probability\nx,1,2,3,0.9\n")
    with pytest.raises(LungCTError, match="--annotations"):
        load_candidates(path)
    table = load_candidates(tiny["candidates"], annotations=tiny["annotations"])
    # The tiny set places positives inside their nodule, so the rule reproduces the class column.
    assert np.array_equal(table.label, load_candidates(tiny["candidates"]).label)


def test_negatives_on_excluded_findings_are_found(tmp_path):
    path = tmp_path / "excluded.csv"
    path.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\na,0,0,0,-1\nb,50,50,50,4\n")
    table = CandidateTable(
        ["a", "b"],
        [0, 0, 0, 1, 1],
        [[4.9, 0, 0], [5.1, 0, 0], [1, 1, 1], [51, 50, 50], [50, 50, 40]],
        label=[0, 0, 1, 0, 0],
    )
    # unknown diameter = 10 mm (as the evaluation); positives are never dropped
    assert excluded_rows(table, path).tolist() == [True, False, False, True, False]


def test_folds_from_layout_and_cache_must_agree(tmp_path, tiny):
    table = load_candidates(tiny["candidates"])
    cache = ScanCache(tiny["cache"])
    layout = folds_from_layout(tiny["data"])
    folds = series_folds(cache, table.uids, layout)
    assert [folds[u] for u in tiny["uids"]] == tiny["folds"]
    rows = rows_in_folds(table, folds, [1])
    assert set(table.series_index[rows]) == {table.uids.index(tiny["uids"][1])}
    wrong = dict(layout)
    wrong[tiny["uids"][0]] = 9
    with pytest.raises(LungCTError, match="prepare the cache again"):
        series_folds(cache, table.uids, wrong)


def test_resize_nearest_and_cubic():
    x = np.arange(26 * 40 * 40, dtype=np.float32).reshape(1, 26, 40, 40)
    near = resize_patches(x, (6, 20, 20), "nearest")
    assert near.shape == (1, 6, 20, 20)
    assert set(np.unique(near)).issubset(set(np.unique(x)))  # nearest copies voxels
    cubic = resize_patches(x, (6, 20, 20), "cubic")
    assert cubic.shape == (1, 6, 20, 20)
    assert abs(cubic.mean() - x.mean()) < 0.01 * x.mean()


def _bright_dot_cache(tmp_path):
    vol = np.full((30, 50, 50), -1000, np.int16)
    geometry = Geometry((50, 50, 30), (1.0, 1.0, 1.0), (10.0, 20.0, 30.0))
    centre_zyx = (15, 25, 25)
    vol[14:17, 24:27, 24:27] = 400  # a 3-voxel cube, so trilinear sampling also reaches 400
    vol[15, 25, 27:31] = 0  # a short arm towards +x makes rotations visible
    write_cache_entry(tmp_path, "dot", vol, geometry, 0)
    return ScanCache(tmp_path), geometry.voxel_to_world(centre_zyx)


def test_patch_cutter_scales_share_the_centre(tmp_path):
    cache, world = _bright_dot_cache(tmp_path)
    plan = get_plan("default")
    cutter = PatchCutter(plan, cache)
    hu = cutter.cut_hu(cache.open("dot"), world)
    for patch, size in zip(hu, plan.patch_sizes, strict=True):
        assert patch.shape == tuple(reversed(size))
        assert patch[size[2] // 2, size[1] // 2, size[0] // 2] == 400
    s1, s2, s3 = cutter.cut("dot", world[None])
    assert s1.shape == s2.shape == s3.shape == (1, 20, 20, 6)
    assert s3[0, 10, 10, 3] == 1.0  # (y, x, z); windowed to [0, 1]
    assert s3.min() == 0.0
    # Off-grid cutting (trilinear sampling) gives the same centre.
    sampled = PatchCutter(plan.replace(cut_spacing=(0.5, 0.5, 1.0)), cache)
    t3 = sampled.cut("dot", world[None])[2]
    assert t3.shape == (1, 20, 20, 6) and t3.max() == 1.0
    assert t3[0, 9:11, 9:11, 2:4].min() == 1.0  # centred between voxels 9, 10 (and 2, 3)


def test_rotations_are_axial_quarter_turns(tmp_path):
    cache, world = _bright_dot_cache(tmp_path)
    cutter = PatchCutter(get_plan("default"), cache)
    plain = cutter.cut("dot", np.repeat(world[None], 4, axis=0))
    turned = cutter.cut("dot", np.repeat(world[None], 4, axis=0), rotations=np.arange(4))
    for scale_plain, scale_turned in zip(plain, turned, strict=True):
        for k in range(4):
            np.testing.assert_array_equal(scale_turned[k], np.rot90(scale_plain[k], k, axes=(0, 1)))
    assert not np.array_equal(turned[2][1], plain[2][1])


def test_sampler_batches_are_balanced_and_augmented(tiny):
    table = load_candidates(tiny["candidates"])
    cache = ScanCache(tiny["cache"])
    plan = get_plan("default").replace(batch_size=14, negatives_per_positive=6, steps_per_epoch=0)
    rows = np.arange(len(table))
    sampler = BalancedBatchSampler(plan, PatchCutter(plan, cache), table, rows)
    assert sampler.n_pos == 2 and sampler.n_neg == 12
    n_neg = int((table.label == 0).sum())
    assert len(sampler) == -(-n_neg // 12)  # one pass over the negatives
    batches = list(sampler.epoch(0))
    for inputs, labels in batches:
        assert [x.shape for x in inputs] == [(14, 20, 20, 6)] * 3
        assert labels.sum() == 2
    # Same seed and epoch -> same batches (resume draws what an uninterrupted run would).
    again = next(iter(sampler.epoch(0)))
    np.testing.assert_array_equal(again[0][0], batches[0][0][0])
    # Positives are augmented: over many draws they are not all identical copies.
    rng = np.random.default_rng(1)
    pos_patches = []
    for _ in range(6):
        inputs, labels = sampler.draw(rng)
        pos_patches += list(inputs[2][labels[:, 0] == 1])
    distinct = {p.tobytes() for p in pos_patches}
    n_positive_rows = int((table.label == 1).sum())
    assert len(distinct) > n_positive_rows


def test_sampler_sees_every_negative_each_epoch(tiny):
    table = load_candidates(tiny["candidates"])
    plan = get_plan("paper").replace(batch_size=4, negatives_per_positive=3)
    cutter = PatchCutter(plan, ScanCache(tiny["cache"]))
    sampler = BalancedBatchSampler(plan, cutter, table, np.arange(len(table)))
    negatives = set(np.flatnonzero(table.label == 0).tolist())
    for epoch in range(2):
        seen = []
        for batch in sampler.epoch_plan(epoch):
            assert batch.labels.sum() == 1
            positives = batch.rows[batch.labels[:, 0] == 1]
            assert set(table.label[positives]) == {1}
            seen += batch.rows[batch.labels[:, 0] == 0].tolist()
            # The paper moves only positives: negatives keep rotation 0, no flip, no shift.
            neg = batch.labels[:, 0] == 0
            assert not batch.rotations[neg].any() and not batch.shifts_mm[neg].any()
            assert not batch.flips.any()
        assert negatives.issubset(seen)
        assert len(seen) - len(negatives) < 3  # the last batch may wrap around


def test_sampler_refuses_one_class(tiny):
    table = load_candidates(tiny["candidates"])
    plan = get_plan("default")
    neg_only = np.flatnonzero(table.label == 0)
    with pytest.raises(LungCTError, match="need both"):
        BalancedBatchSampler(plan, PatchCutter(plan, ScanCache(tiny["cache"])), table, neg_only)


def test_validation_rows_keep_all_positives(tiny):
    table = load_candidates(tiny["candidates"])
    rows = validation_rows(table, np.arange(len(table)), max_negatives=3)
    assert (table.label[rows] == 1).sum() == (table.label == 1).sum()
    assert (table.label[rows] == 0).sum() == 3


def test_symmetries_form_the_square_group():
    x = np.random.default_rng(0).random((1, 4, 4, 2))
    images = {apply_symmetry(x, k, f).tobytes() for k, f in AXIAL_SYMMETRIES}
    assert len(images) == 8
    assert len({apply_symmetry(x, *s).tobytes() for s in VOLUME_SYMMETRIES}) == 16


def test_tta_is_invariant_to_axial_symmetries():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(20, 20, 6))

    def not_invariant(inputs):  # a linear score that depends on orientation
        return np.tanh((inputs[0] * weights).sum(axis=(1, 2, 3)) / 100 + inputs[2].mean())

    x = [rng.random((3, 20, 20, 6)) for _ in range(3)]
    base = tta_predict(not_invariant, x)
    assert not np.allclose(
        not_invariant([apply_symmetry(s, 1, False) for s in x]), not_invariant(x)
    )
    for k, flip in AXIAL_SYMMETRIES:
        moved = [apply_symmetry(s, k, flip) for s in x]
        np.testing.assert_allclose(tta_predict(not_invariant, moved), base, rtol=1e-10)
    full = tta_predict(not_invariant, x, VOLUME_SYMMETRIES)
    flipped = [apply_symmetry(s, 1, True, True) for s in x]
    np.testing.assert_allclose(tta_predict(not_invariant, flipped, VOLUME_SYMMETRIES), full)


def test_tta_with_a_model_is_invariant():
    from fp_reduction_3dcnn.model import MGICNN

    model = MGICNN(stream_filters=(4, 4, 4), stream_top_filters=4, head_filters=4, dense_units=(8,))

    def predict(inputs):
        import keras

        return keras.ops.convert_to_numpy(model([s.astype("float32") for s in inputs]))

    rng = np.random.default_rng(2)
    x = [rng.random((2, 20, 20, 6)) for _ in range(3)]
    base = tta_predict(predict, x)
    turned = tta_predict(predict, [apply_symmetry(s, 3, True) for s in x])
    np.testing.assert_allclose(turned, base, rtol=1e-4, atol=1e-6)
