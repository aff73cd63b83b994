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


def test_prepare_joins_a_running_cluster(tmp_path: Path) -> None:
    """``--ray-address``: a cluster started apart (``ray start --head``, as on a cluster's head
    machine) runs the scans; the command leaves it running."""
    pytest.importorskip("ray")
    import shutil
    import signal
    import socket
    import subprocess
    import tempfile
    import time

    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray command is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(repo),
        "RAY_USAGE_STATS_ENABLED": "0",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    # Its own temporary folder, never another Ray's; short, since Ray's socket paths inside it
    # must stay under the system's limit of about 107 characters.
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    head_log = tmp_path / "ray-head.log"
    start = [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2"]
    start += ["--include-dashboard=false", f"--temp-dir={temp}"]
    # --block keeps the head in this process group, so the test stops this cluster alone
    # (``ray stop`` would stop every Ray of the machine).
    with open(head_log, "w") as log:
        head = subprocess.Popen(
            start, cwd=repo, env=env, stdout=log, stderr=log, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in head_log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed: {head_log.read_text()[-1500:]}")
            time.sleep(0.5)
        data = write_tiny_luna(tmp_path / "data", scans_per_fold=1, folds=3)
        plan = tmp_path / "plan.json"
        PreprocessPlan(name="test4mm", spacing=(4.0, 4.0, 4.0)).save(plan)
        cache = tmp_path / "cache"
        argv = [sys.executable, "-m", "lungct", "prepare", "--data", str(data), "--cache"]
        argv += [str(cache), "--plan", str(plan), "--ray", "--ray-address", f"127.0.0.1:{port}"]
        done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {
            "prepared": 3,
            "skipped": 0,
            "failed": 0,
        }
        assert len(ScanCache(cache).seriesuids()) == 3
        # The cluster outlives the command that joined it: a second run joins it again.
        assert head.poll() is None
        done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["skipped"] == 3

        # An address where no cluster runs: one line, exit 2.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            nobody = s.getsockname()[1]
        argv[-1] = f"127.0.0.1:{nobody}"
        argv[argv.index(str(cache))] = str(tmp_path / "cache2")  # work to do: Ray is needed
        done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2
        assert f"cannot reach the Ray cluster at 127.0.0.1:{nobody}" in done.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):  # the head may have ended already
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
        # ``ray start`` names its cluster in /tmp/ray for a later ray.init() to join: not this
        # one, now stopped.
        current = Path("/tmp/ray/ray_current_cluster")
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{port}"):
                current.unlink()
