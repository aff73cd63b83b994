"""Hostile conditions for the writers: a full disk, a read-only folder, a cut-short cache file,
a killed ``prepare``.

Each case runs the real command in a child process. A full disk is the child's own file-size
limit (``RLIMIT_FSIZE``, with SIGXFSZ ignored so a write fails with EFBIG instead of killing the
process); a read-only folder is mode 0555, with root's permission override taken away from the
child (its capability bounding set, or the ``nobody`` user). A refused write must end in exit
status 2 and one stderr line naming the output, with every file that was there before unchanged
and nothing new left behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pwd
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, phantom_hu
from lungct.cache import ScanCache
from lungct.fileio import npy_problem, npz_problem, png_problem, save_npy_atomic
from lungct.geometry import Geometry
from lungct.io import write_image, write_scan
from lungct.preprocess import PreprocessPlan
from lungct.scan import Scan

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux rlimits and /proc")

TAG_VARIABLE = "LUNGCT_HOSTILE_WRITING_TAG"
COARSE = PreprocessPlan(name="test2mm", spacing=(2.0, 2.0, 2.0))


# ----------------------------------------------------------------------------------------------
# Running a command in hostile conditions
# ----------------------------------------------------------------------------------------------


def file_size_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn`` giving the child a full disk after ``limit`` bytes of any one file."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run(
    module: str,
    *args: str | Path,
    preexec: Callable[[], None] | None = None,
    tag: str | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository, its output captured."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if tag:
        env[TAG_VARIABLE] = tag
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=env,
        preexec_fn=preexec,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def hashes(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` (hidden ones too) with the SHA-256 of its bytes, and every
    folder."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                found[str(path)] = "folder"
    return found


_PROGRESS_BAR = re.compile(r"^[\w ]+:\s+\d+%\|")


def message_lines(stderr: str) -> list[str]:
    """The stderr lines other than progress-bar updates (which a long command shows)."""
    return [line for line in stderr.splitlines() if line and not _PROGRESS_BAR.match(line)]


def assert_refused(
    proc: subprocess.CompletedProcess, paths: Path | Iterable[Path], before: dict, *roots: Path
) -> str:
    """Exit 2, one stderr line naming one of ``paths``, no traceback, ``roots`` unchanged."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = message_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    named = [paths] if isinstance(paths, Path) else list(paths)
    assert any(lines[0].startswith(f"error: {p}: ") for p in named), (lines[0], named)
    assert hashes(*roots) == before, "files changed, appeared or were left behind"
    return lines[0]


def tagged_processes(tag: str) -> list[int]:
    """Running (not zombie) processes whose environment carries ``tag``."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


# ----------------------------------------------------------------------------------------------
# A folder that cannot be written, even by root
# ----------------------------------------------------------------------------------------------

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


def _drop_permission_override() -> None:
    """Child of root: remove the capabilities that ignore file modes from the bounding set, so
    the program it executes runs as root without them (file modes apply to it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) refused")


def _become_nobody() -> None:
    user = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


def _open_up(tmp_path: Path) -> None:
    """Let another user reach and read the test's files (pytest makes its folders 0700)."""
    for folder in [tmp_path, *tmp_path.parents]:
        mode = folder.stat().st_mode
        if folder.stat().st_uid == os.geteuid() and not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IROTH | stat.S_IXOTH)
    for path in tmp_path.rglob("*"):
        mode = path.stat().st_mode
        extra = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)
        if path.stat().st_uid == os.geteuid() and not path.is_symlink():
            path.chmod(mode | extra)


def read_only(folder: Path, tmp_path: Path) -> Callable[[], None] | None:
    """Make ``folder`` (and what is in it) read-only to the child; returns its ``preexec_fn``.

    Skips only where neither a non-root user, nor root without its permission override, nor
    the ``nobody`` user is available.
    """
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() != 0:
        return None
    probe = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", str(folder / "probe")]
    for preexec in (_drop_permission_override, _become_nobody):
        if preexec is _become_nobody:
            _open_up(tmp_path)
        try:
            done = subprocess.run(probe, preexec_fn=preexec, capture_output=True, check=False)
        except (subprocess.SubprocessError, OSError):
            continue
        if done.returncode != 0 and b"PermissionError" in done.stderr:
            return preexec
        (folder / "probe").unlink(missing_ok=True)
    pytest.skip("running as root, and neither dropping CAP_DAC_OVERRIDE nor `nobody` works here")


def writable_again(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def write_phantom(path: Path, uid: str = "1.2.826.0.7.1", shift: float = 0.0) -> Path:
    geo = Geometry((96, 80, 40), (3.0, 3.0, 4.0), (-150.0 + shift, -120.0, -300.0))
    write_scan(Scan(phantom_hu((40, 80, 96), (20, 40, 29), 2.5), geo, uid), path)
    return path


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    """A small chest phantom with lungs big enough for the lung mask."""
    root = tmp_path_factory.mktemp("scan")
    return write_phantom(root / "1.2.826.0.7.1.mhd")


def dataset(root: Path, n: int) -> list[str]:
    uids = [f"1.2.826.0.8.{i}" for i in range(n)]
    for i, uid in enumerate(uids):
        write_phantom(root / "subset0" / f"{uid}.mhd", uid, shift=float(i))
    return uids


def only(data: Path, uid: str, dest: Path) -> Path:
    """A dataset folder holding one scan of ``data``."""
    (dest / "subset0").mkdir(parents=True)
    for f in (data / "subset0").glob(f"{uid}.*"):
        shutil.copy(f, dest / "subset0" / f.name)
    return dest


@pytest.fixture(scope="module")
def coarse_cache(tmp_path_factory) -> dict:
    """Three phantom scans and a 2 mm cache of the first one (made by the real command)."""
    root = tmp_path_factory.mktemp("cache_inputs")
    uids = dataset(root / "data", 3)
    COARSE.save(root / "plan.json")
    one = only(root / "data", uids[0], root / "one")
    done = run(
        "lungct", "prepare", "--data", one, "--cache", root / "cache",
        "--plan", root / "plan.json", "--workers", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {
        "data": root / "data",
        "one": one,
        "plan": root / "plan.json",
        "cache": root / "cache",
        "uids": uids,
    }


def copy_cache(coarse_cache: dict, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(coarse_cache["cache"], cache)
    return cache


EVALUATION_INPUTS = {
    "annotations": "seriesuid,coordX,coordY,coordZ,diameter_mm\ns0,0,0,0,10\ns1,0,0,0,10\n",
    "excluded": "seriesuid,coordX,coordY,coordZ,diameter_mm\ns0,50,0,0,-1\n",
    "seriesuids": "s0\ns1\ns2\n",
    "results": "seriesuid,coordX,coordY,coordZ,probability\n"
    "s0,1,0,0,0.8\ns0,200,0,0,0.9\ns0,50,1,0,0.99\ns2,9,9,9,0.3\n",
}


def evaluation_args(tmp_path: Path, out: Path, bootstrap: int) -> list[str | Path]:
    args: list[str | Path] = ["evaluate"]
    for name, text in EVALUATION_INPUTS.items():
        path = tmp_path / f"{name}.csv"
        path.write_text(text)
        args += [f"--{name}", path]
    return [*args, "--out", out, "--bootstrap", str(bootstrap)]


@pytest.fixture()
def evaluated(tmp_path: Path) -> Path:
    """An output folder holding a complete evaluation (with a bootstrap)."""
    out = tmp_path / "out"
    done = run("integration", *evaluation_args(tmp_path, out, 20))
    assert done.returncode == 0, done.stderr
    assert (out / "froc_bootstrap.csv").is_file() and (out / "metrics.json").is_file()
    return out


# ----------------------------------------------------------------------------------------------
# Full disk, one writer class at a time
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mhd", ".mha", ".nii", ".nii.gz"])
def test_full_disk_keeps_the_previous_mask(scan: Path, tmp_path: Path, suffix: str) -> None:
    """MetaImage and NIfTI: SimpleITK's NIfTI writer reports nothing on a short write."""
    out = tmp_path / f"mask{suffix}"
    first = run("lungct", "lungmask", scan, "--out", out)
    assert first.returncode == 0, first.stderr
    before = hashes(tmp_path)
    proc = run("lungct", "lungmask", scan, "--out", out, preexec=file_size_limit(300))
    line = assert_refused(proc, out, before, tmp_path)
    assert "nothing was replaced" in line or "File too large" in line


def test_full_disk_keeps_the_previous_png(scan: Path, tmp_path: Path) -> None:
    out = tmp_path / "views.png"
    first = run("lungct", "show", scan, "--out", out)
    assert first.returncode == 0, first.stderr
    before = hashes(tmp_path)
    proc = run("lungct", "show", scan, "--out", out, preexec=file_size_limit(2000))
    assert_refused(proc, out, before, tmp_path)


def test_full_disk_on_the_first_csv_keeps_the_evaluation(evaluated: Path, tmp_path: Path) -> None:
    before = hashes(tmp_path)
    args = evaluation_args(tmp_path, evaluated, 20)
    proc = run("integration", *args, preexec=file_size_limit(60))
    assert_refused(proc, evaluated / "froc.csv", before, tmp_path)


def test_full_disk_midway_never_mixes_two_evaluations(evaluated: Path, tmp_path: Path) -> None:
    """froc.csv and nodules.csv fit, froc.png does not: the earlier set stays whole (its
    bootstrap table included) and none of the new files reaches the folder."""
    before = hashes(tmp_path)
    args = evaluation_args(tmp_path, evaluated, 0)
    proc = run("integration", *args, preexec=file_size_limit(10_000))
    assert_refused(proc, evaluated / "froc.png", before, tmp_path)


def test_full_disk_on_the_plan_json(coarse_cache: dict, tmp_path: Path) -> None:
    cache = copy_cache(coarse_cache, tmp_path)
    (cache / "plan.json").unlink()
    before = hashes(tmp_path)
    proc = run(
        "lungct", "prepare", "--data", coarse_cache["data"], "--cache", cache,
        "--plan", coarse_cache["plan"], "--workers", "1",
        preexec=file_size_limit(50),
    )  # fmt: skip
    assert_refused(proc, cache / "plan.json", before, tmp_path)


@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_on_a_cache_array(coarse_cache: dict, tmp_path: Path, workers: int) -> None:
    """The first entry is kept; the others fail at volume.npy and leave no entry behind; the
    whole prepare stops (exit 2), and no worker outlives it."""
    cache = copy_cache(coarse_cache, tmp_path)
    before = hashes(tmp_path)
    tag = uuid.uuid4().hex
    proc = run(
        "lungct", "prepare", "--data", coarse_cache["data"], "--cache", cache,
        "--plan", coarse_cache["plan"], "--workers", str(workers),
        preexec=file_size_limit(100_000), tag=tag,
    )  # fmt: skip
    targets = [cache / uid / "volume.npy" for uid in coarse_cache["uids"][1:]]
    assert_refused(proc, targets, before, tmp_path)
    assert tagged_processes(tag) == []
    assert ScanCache(cache).seriesuids() == coarse_cache["uids"][:1]


@pytest.mark.slow
def test_full_disk_keeps_the_previous_detection(tmp_path: Path) -> None:
    """``integration detect`` (shipped models): overview.png does not fit, so nothing of the
    new run reaches the folder, which keeps the earlier run's files."""
    scan = tmp_path / "9.8.7.mhd"
    geo = Geometry((96, 80, 40), (2.5, 2.5, 2.5), (0.0, 0.0, 0.0))
    write_image(phantom_hu((40, 80, 96), (20, 40, 29)), geo, scan)
    out = tmp_path / "detect"
    out.mkdir()
    for name in ("detections.csv", "summary.json", "report.html", "overview.png"):
        (out / name).write_text(f"an earlier run's {name}\n")
    before = hashes(tmp_path)
    proc = run(
        "integration", "detect", "--scan", scan, "--out", out, preexec=file_size_limit(20_000)
    )
    assert_refused(proc, out / "overview.png", before, tmp_path)


# ----------------------------------------------------------------------------------------------
# Folders that cannot be written
# ----------------------------------------------------------------------------------------------


def test_read_only_folder_keeps_the_previous_mask(scan: Path, tmp_path: Path) -> None:
    folder = tmp_path / "masks"
    out = folder / "mask.nii.gz"
    assert run("lungct", "lungmask", scan, "--out", out).returncode == 0
    preexec = read_only(folder, tmp_path)
    before = hashes(folder)
    try:
        proc = run("lungct", "lungmask", scan, "--out", out, preexec=preexec)
        line = assert_refused(proc, out, before, folder)
    finally:
        writable_again(folder)
    assert "Permission denied" in line


def test_read_only_evaluation_folder(evaluated: Path, tmp_path: Path) -> None:
    args = evaluation_args(tmp_path, evaluated, 0)
    preexec = read_only(evaluated, tmp_path)
    before = hashes(evaluated)
    try:
        proc = run("integration", *args, preexec=preexec)
        assert_refused(proc, evaluated, before, evaluated)
    finally:
        writable_again(evaluated)


def test_read_only_cache_folder(coarse_cache: dict, tmp_path: Path) -> None:
    cache = copy_cache(coarse_cache, tmp_path)
    preexec = read_only(cache, tmp_path)
    before = hashes(cache)
    try:
        proc = run(
            "lungct", "prepare", "--data", coarse_cache["data"], "--cache", cache,
            "--plan", coarse_cache["plan"], "--workers", "1", preexec=preexec,
        )  # fmt: skip
        targets = [cache / uid for uid in coarse_cache["uids"][1:]]
        assert_refused(proc, targets, before, cache)
    finally:
        writable_again(cache)


# ----------------------------------------------------------------------------------------------
# Broken cache entries are rebuilt, not skipped
# ----------------------------------------------------------------------------------------------


def _break_and_prepare(coarse_cache: dict, tmp_path: Path, damage: Callable[[Path], None]) -> None:
    cache = copy_cache(coarse_cache, tmp_path)
    uid = coarse_cache["uids"][0]
    entry = cache / uid
    good = hashes(entry)
    damage(entry)
    assert hashes(entry) != good
    assert not ScanCache(cache).is_complete(uid)
    proc = run(
        "lungct", "prepare", "--data", coarse_cache["one"], "--cache", cache,
        "--plan", coarse_cache["plan"], "--workers", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"prepared": 1, "skipped": 0, "failed": 0}
    assert hashes(entry) == good  # the same scan, plan and source: the same bytes
    rebuilt = ScanCache(cache).open(uid)
    assert rebuilt.volume.shape == rebuilt.geometry.shape_zyx


def test_truncated_volume_is_rebuilt(coarse_cache: dict, tmp_path: Path) -> None:
    def cut(entry: Path) -> None:
        path = entry / "volume.npy"
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)

    _break_and_prepare(coarse_cache, tmp_path, cut)


def test_lung_mask_of_another_shape_is_rebuilt(coarse_cache: dict, tmp_path: Path) -> None:
    def replace(entry: Path) -> None:
        np.save(entry / "lung.npy", np.zeros((3, 4, 5), np.uint8))

    _break_and_prepare(coarse_cache, tmp_path, replace)


# ----------------------------------------------------------------------------------------------
# An interrupted prepare ends its workers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def six_scans(tmp_path_factory) -> Path:
    """Six phantoms that take a few seconds to prepare at 1 mm with two workers."""
    root = tmp_path_factory.mktemp("six")
    dataset(root, 6)
    return root


@pytest.mark.parametrize(
    ("how", "status"),
    [("SIGINT to the group", 130), ("SIGTERM", 143), ("SIGKILL", -signal.SIGKILL)],
)
def test_interrupted_prepare_leaves_no_worker(
    six_scans: Path, tmp_path: Path, how: str, status: int
) -> None:
    cache = tmp_path / "cache"
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{TAG_VARIABLE: tag})
    argv = [
        sys.executable,
        "-m",
        "lungct",
        "prepare",
        "--data",
        str(six_scans),
        "--cache",
        str(cache),
    ]
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
        # As from a terminal: a test run started in the background (CI, `make test &`)
        # inherits SIGINT ignored, and Python then never turns Ctrl-C into an interrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob("*/meta.json")):  # workers are busy with the other scans
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "prepare made no entry in 2 minutes"
            time.sleep(0.05)
        workers = [pid for pid in tagged_processes(tag) if pid != proc.pid]
        assert len(workers) >= 2
        if how.startswith("SIGINT"):
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            os.kill(proc.pid, getattr(signal, how))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == status, err
    if status == 130:
        assert message_lines(err) == ["interrupted"]
    if status > 0:
        assert "Traceback" not in err, err
        assert tagged_processes(tag) == []
        assert not list(cache.rglob(".partial-*")), "a stopped worker left its staging folder"
    else:  # the parent had no chance to clean up: the workers end on their own
        deadline = time.monotonic() + 10
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tagged_processes(tag) == []
    entries = ScanCache(cache)
    for uid in entries.seriesuids():
        assert entries.entry_problem(uid) is None, uid
    if how == "SIGTERM":  # the next prepare finishes the job
        rerun = run("lungct", "prepare", "--data", six_scans, "--cache", cache)
        assert rerun.returncode == 0, rerun.stderr
        summary = json.loads(rerun.stdout.splitlines()[-1])
        assert summary["prepared"] + summary["skipped"] == 6 and summary["failed"] == 0
        assert not list(cache.rglob(".partial-*"))


# ----------------------------------------------------------------------------------------------
# Folders are published whole; checks of written files
# ----------------------------------------------------------------------------------------------


def test_a_new_evaluation_removes_the_old_optional_files(evaluated: Path, tmp_path: Path) -> None:
    proc = run("integration", *evaluation_args(tmp_path, evaluated, 0))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in evaluated.iterdir()) == [
        "froc.csv",
        "froc.png",
        "metrics.json",
        "nodules.csv",
    ]


def test_checks_find_cut_off_files(tmp_path: Path) -> None:
    array = np.arange(1000, dtype=np.int16).reshape(10, 10, 10)
    npy = tmp_path / "a.npy"
    save_npy_atomic(npy, array)
    assert npy_problem(npy, array.shape, array.dtype) is None
    assert "shape" in npy_problem(npy, (10, 10, 9))
    npz = tmp_path / "a.npz"
    with zipfile.ZipFile(npz, "w") as zf:
        zf.writestr("a.npy", npy.read_bytes())
    assert npz_problem(npz) is None
    png = tmp_path / "a.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(png)
    plt.close(fig)
    assert png_problem(png) is None
    for path, problem in ((npy, npy_problem), (npz, npz_problem), (png, png_problem)):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 7])
        assert problem(path) is not None, path.name
