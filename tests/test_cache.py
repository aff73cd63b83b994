"""The per-scan cache: prepare a LUNA16-layout folder, resume, and open entries as memory maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import phantom_hu
from lungct.__main__ import main
from lungct.cache import ScanCache, find_scans, prepare_dataset
from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.io import write_scan
from lungct.patches import PatchQueue, PatchRequest, crop_patch, sample_patch
from lungct.preprocess import PreprocessPlan
from lungct.scan import Scan

FLIP_Z = (1, 0, 0, 0, 1, 0, 0, 0, -1)


def _dataset(root: Path, n: int = 3) -> dict[str, np.ndarray]:
    """``n`` phantom scans in subset0..; returns each one's nodule world centre."""
    centres = {}
    for i in range(n):
        uid = f"1.2.826.0.1.{i}"
        direction = FLIP_Z if i % 2 else (1, 0, 0, 0, 1, 0, 0, 0, 1)
        geo = Geometry((96, 80, 40), (3.0, 3.0, 4.0), (-150.0 + i, -120.0, -300.0), direction)
        hu = phantom_hu(shape_zyx=(40, 80, 96), nodule_zyx=(20, 40, 29), radius_vox=2.5)
        write_scan(Scan(hu, geo, uid), root / f"subset{i % 10}" / f"{uid}.mhd")
        centres[uid] = geo.voxel_to_world([20, 40, 29])
    return centres


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("cache_ds")
    centres = _dataset(root / "data")
    report = prepare_dataset(root / "data", root / "cache", workers=2, progress=False)
    assert sorted(report["prepared"]) == sorted(centres) and not report["failed"]
    return root / "data", root / "cache", centres


def test_cache_entries_are_complete_and_memory_mapped(prepared) -> None:
    _, cache_dir, centres = prepared
    cache = ScanCache(cache_dir)
    assert cache.seriesuids() == sorted(centres)
    assert cache.plan == PreprocessPlan()
    for uid, world in centres.items():
        entry = cache.open(uid)
        assert isinstance(entry.volume, np.memmap) and entry.volume.dtype == np.int16
        assert entry.geometry.spacing == (1.0, 1.0, 1.0)
        assert entry.geometry.direction == (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
        z, y, x = entry.geometry.world_to_index(world)
        assert entry.volume[z, y, x] > -100, "nodule centre must stay at its world position"
        assert entry.lung[z, y, x] == 1
        assert entry.fold == int(uid.rsplit(".", 1)[1]) % 10
        assert 50 < entry.meta["lung_volume_ml"] < 5000


def test_prepare_skips_complete_entries_and_resumes(prepared, tmp_path: Path) -> None:
    data, cache_dir, centres = prepared
    report = prepare_dataset(data, cache_dir, workers=1, progress=False)
    assert report["prepared"] == [] and sorted(report["skipped"]) == sorted(centres)
    # An interrupted entry (no meta.json) is redone.
    victim = sorted(centres)[0]
    (cache_dir / victim / "meta.json").unlink()
    report = prepare_dataset(data, cache_dir, workers=1, progress=False)
    assert report["prepared"] == [victim]


def test_prepare_refuses_another_plan(prepared) -> None:
    data, cache_dir, _ = prepared
    with pytest.raises(LungCTError, match="cache was made with plan"):
        prepare_dataset(data, cache_dir, PreprocessPlan(name="x", spacing=(2, 2, 2)))


def test_prepare_reports_a_broken_scan_and_does_the_rest(tmp_path: Path, capsys) -> None:
    _dataset(tmp_path / "data", n=2)
    bad = tmp_path / "data" / "subset5" / "9.9.9.mhd"
    bad.parent.mkdir()
    bad.write_text("NDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\nElementDataFile = 9.raw\n")
    code = main(["prepare", "--data", str(tmp_path / "data"), "--cache", str(tmp_path / "c")])
    assert code == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == {
        "prepared": 2,
        "skipped": 0,
        "failed": 1,
    }
    assert f"error: {bad}: pixel data file '9.raw' is missing" in captured.err


def test_find_scans_folds_and_errors(prepared, tmp_path: Path) -> None:
    data, _, _ = prepared
    assert [s.fold for s in find_scans(data, folds=[1])] == [1]
    with pytest.raises(LungCTError, match="no .mhd scans found in subsets"):
        find_scans(data, folds=[7])
    with pytest.raises(LungCTError, match="dataset folder does not exist"):
        find_scans(tmp_path / "nope")


def test_open_missing_entry(prepared) -> None:
    _, cache_dir, _ = prepared
    with pytest.raises(LungCTError, match="series 1.2.3 is not in the cache"):
        ScanCache(cache_dir).open("1.2.3")


def test_patches_by_world_coordinates(prepared) -> None:
    _, cache_dir, centres = prepared
    cache = ScanCache(cache_dir)
    uid = sorted(centres)[1]
    entry = cache.open(uid)
    crop = crop_patch(entry.volume, entry.geometry, centres[uid], (8, 16, 16))
    assert crop.shape == (8, 16, 16) and crop[4, 8, 8] > -100
    sampled = sample_patch(entry.volume, entry.geometry, centres[uid], (9, 9, 9), (1, 1, 1))
    assert sampled.shape == (9, 9, 9) and sampled[4, 4, 4] > -100
    # Far outside the volume: all air, no error.
    far = crop_patch(entry.volume, entry.geometry, (1e4, 1e4, 1e4), (4, 4, 4))
    assert (far == -1024).all()
    edge = crop_patch(entry.volume, entry.geometry, entry.voxel_to_world([0, 0, 0]), (4, 4, 4))
    assert (edge[:2] == -1024).all()


def test_patch_queue_buffer_is_bounded_and_complete(prepared) -> None:
    _, cache_dir, centres = prepared
    cache = ScanCache(cache_dir)
    reqs = [
        PatchRequest(uid, tuple(c + np.array([dx, 0, 0])), label=dx)
        for uid, c in centres.items()
        for dx in range(10)
    ]
    held = []

    def cut(scan, r):
        held.append(1)
        return crop_patch(scan.volume, scan.geometry, r.center_world, (4, 4, 4))

    queue = PatchQueue(cache, reqs, cut, buffer_size=5, seed=3)
    seen = []
    for patch, req in queue:
        assert len(held) - len(seen) <= 5  # never more than the buffer cut ahead
        seen.append((req.seriesuid, req.label))
        assert patch.shape == (4, 4, 4)
    assert sorted(seen) == sorted((r.seriesuid, r.label) for r in reqs)
    second = [(r.seriesuid, r.label) for _, r in queue]
    assert second != seen  # a new epoch shuffles anew


def test_prefetch_keeps_order_raises_in_place_and_stops_early() -> None:
    import threading

    from lungct.patches import prefetch

    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        yield 2
        raise ValueError("bad patch")

    got = []
    with pytest.raises(ValueError, match="bad patch"):
        for item in prefetch(broken(), depth=2):
            got.append(item)
    assert got == [1, 2]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    for item in prefetch(endless(), depth=2):
        if item == 3:
            break
    assert threading.active_count() == before  # the producer thread has ended
    assert len(produced) <= 3 + 1 + 2 + 1  # no more than depth ahead of the consumer


def test_recent_scans_from_several_threads(prepared) -> None:
    """The trainers cut patches in two threads from one RecentScans: opening, reusing and
    closing entries at once must neither fail nor keep more than ``keep`` open."""
    import sys
    import threading

    from lungct.cache import RecentScans

    _, cache_dir, centres = prepared
    scans = RecentScans(ScanCache(cache_dir), keep=1)
    uids = sorted(centres)
    failures: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(1500):
                uid = uids[(i + offset) % len(uids)]
                assert scans(uid).seriesuid == uid
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures[0]
    assert len(scans._open) <= 1
