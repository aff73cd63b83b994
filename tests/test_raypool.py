"""One scan per task on a real local Ray (lungct.raypool): results as they finish, a worker that
dies fails its item only, setup and write errors end the run; `lungct prepare --ray`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

from lungct.__main__ import main as lungct_main
from lungct.cache import ScanCache
from lungct.errors import LungCTError
from lungct.fileio import WriteError
from lungct.io import write_scan
from lungct.preprocess import PreprocessPlan
from lungct.raypool import RayOptions, WorkerLost, ray_runtime, stream_on_actors, worker_count
from unet_candidates.testing import phantom_chest, write_tiny_luna


class Doubler:
    """A worker for the test: doubles numbers; dies on "die"; a full disk on "write"."""

    def __init__(self, broken: bool = False) -> None:
        self.error = "models: cannot be loaded (a test)" if broken else None

    def ready(self) -> str | None:
        return self.error

    def run(self, item: object) -> object:
        if item == "die":
            os._exit(1)
        if item == "write":
            raise WriteError("/out/x.csv", "cannot be written (No space left on device)")
        return item * 2


def _prepare(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = lungct_main(argv)
    return code, out.getvalue(), err.getvalue()


def test_actors_on_a_local_ray_and_prepare(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

    data = write_tiny_luna(tmp_path / "data", scans_per_fold=1, folds=2)
    scan, _ = phantom_chest(seriesuid="1.2.3.9.9")
    write_scan(scan, data / "subset1" / "1.2.3.9.9.mhd")
    broken = data / "subset1" / "1.2.3.9.9.zraw"
    broken.write_bytes(broken.read_bytes()[:100])
    plan = tmp_path / "plan.json"
    PreprocessPlan(name="test4mm", spacing=(4.0, 4.0, 4.0)).save(plan)
    cache = tmp_path / "cache"
    argv = ["prepare", "--data", str(data), "--cache", str(cache), "--plan", str(plan), "--ray"]

    with ray_runtime(RayOptions(cpus=2)) as ray_module:
        assert worker_count(ray_module, RayOptions(cpus=2), 10) == 2
        assert worker_count(ray_module, RayOptions(cpus=2), 1) == 1
        results = list(stream_on_actors(ray_module, Doubler, (), [1, "die", 3, 4, 5], 2))
        assert sorted(item for item, _ in results if item != "die") == [1, 3, 4, 5]
        assert all(r == 2 * i for i, r in results if i != "die")
        lost = next(r for i, r in results if i == "die")
        assert isinstance(lost, WorkerLost) and "worker process died" in lost.reason
        with pytest.raises(LungCTError, match="models: cannot be loaded"):
            list(stream_on_actors(ray_module, Doubler, (True,), [1, 2], 2))
        with pytest.raises(WriteError, match="No space left") as info:
            list(stream_on_actors(ray_module, Doubler, (), ["write", 1], 1))
        assert str(info.value) == "/out/x.csv: cannot be written (No space left on device)"

        # prepare --ray on the Ray already running: two scans prepared, the broken one named.
        code, out, err = _prepare([*argv, "--ray-cpus", "2"])
        assert code == 1, err
        assert json.loads(out.strip().splitlines()[-1]) == {
            "prepared": 2,
            "skipped": 0,
            "failed": 1,
        }
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "1.2.3.9.9.mhd" in errors[0]
        assert ScanCache(cache).seriesuids() == ["1.2.3.0.0", "1.2.3.1.0"]
        assert all(ScanCache(cache).is_complete(uid) for uid in ("1.2.3.0.0", "1.2.3.1.0"))
    assert not ray.is_initialized()  # the Ray it started is stopped

    code, out, _ = _prepare(argv[:-1])  # a re-run (here without Ray) prepares nothing again
    assert code == 1
    assert json.loads(out.strip().splitlines()[-1]) == {"prepared": 0, "skipped": 2, "failed": 1}


def test_ray_options_need_ray(tmp_path: Path, monkeypatch) -> None:
    code, _, err = _prepare(["prepare", "--data", "d", "--cache", "c", "--ray-cpus", "2"])
    assert code == 2 and "--ray-cpus and --ray-address go with --ray" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    cache = tmp_path / "cache"
    code, _, err = _prepare(["prepare", "--data", str(tmp_path), "--cache", str(cache), "--ray"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--ray needs Ray" in err
    assert not cache.exists()
