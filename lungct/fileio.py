"""Crash-safe writing, and reading JSON files with errors that name the file.

Every output is written to a temporary file beside its target, flushed to the disk, checked
(its byte count, or its format's header against its length) and only then renamed over the
target. So a full disk, a read-only folder or a quota never replaces a good file with a broken
one: the writer raises :class:`WriteError` naming the target, and what was there stays as it
was. A command that writes several files into one folder stages them and publishes them as a
whole (:func:`staged_outputs`), so an interrupted or failed run never leaves a mix of old and
new files that looks complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lungct.errors import LungCTError
from lungct.headers import check_metaimage_data, read_metaimage_header, read_nifti_header

Check = Callable[[Path], "str | None"]
"""A check of a written temporary file: returns what is wrong with it, or None."""

STAGE_PREFIX = ".partial-"
"""Name prefix of the staging folders of :func:`staged_outputs` (followed by the writer's pid)."""


class WriteError(LungCTError):
    """An output that could not be written whole: a full disk, a read-only folder, a quota.

    It is the machine's problem rather than the input's, so a batch stops at the first one
    instead of failing the same way on every remaining item.
    """


def cannot_write(target: str | os.PathLike, exc: OSError) -> WriteError:
    """The :class:`WriteError` for an ``OSError`` met while writing ``target``."""
    return WriteError(target, f"cannot be written ({exc.strerror or exc})")


@contextlib.contextmanager
def atomic_path(
    target: str | os.PathLike, suffix: str | None = None, check: Check | None = None
) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    After the body the file is flushed to the disk (so a deferred error, such as a quota on a
    network file system, shows now) and checked: by ``check`` when given, otherwise by the
    check of the target's format (:func:`check_for`: PNG, ``.npy``, ``.npz``). If the body
    raises, the flush fails or the check finds a problem, the temporary file is removed and
    ``target`` is left as it was; an ``OSError`` of the temporary file (or with no file named)
    becomes a :class:`WriteError` naming ``target``. ``suffix`` defaults to the target's own
    suffixes so libraries that pick a format from the extension (SimpleITK, numpy) still do
    the right thing.
    """
    target = Path(target)
    if suffix is None:
        suffix = "".join(target.suffixes)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.stem}.", suffix=f".tmp{suffix}", dir=target.parent
        )
        os.close(fd)
    except OSError as exc:
        raise cannot_write(target, exc) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        flush_to_disk(tmp_path)
        problem = (check or check_for(target))(tmp_path)
        if problem:
            raise WriteError(target, f"{problem}; nothing was replaced")
        # mkstemp makes 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except OSError as exc:
        if _names_another_file(exc, (tmp_path, target)):
            raise  # another file's problem; its own message names it
        raise cannot_write(target, exc) from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def _names_another_file(exc: OSError, ours: Sequence[Path]) -> bool:
    name = exc.filename
    if not isinstance(name, (str, bytes, os.PathLike)):
        return False
    return Path(os.fsdecode(name)) not in ours


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def flush_to_disk(path: str | os.PathLike) -> None:
    """``fsync`` a written file, so its data is on the disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically; the file must hold exactly those bytes (and
    pass its format's check, :func:`check_for`)."""
    fmt = check_for(target)

    def check(path: Path) -> str | None:
        return size_problem(path, len(data)) or fmt(path)

    with atomic_path(target, check=check) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npy_atomic(target: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array as ``.npy`` (memory-mappable, no pickle) atomically; the file's header
    must give the array's shape and dtype and its length the array's bytes."""
    array = np.ascontiguousarray(array)

    def check(path: Path) -> str | None:
        return npy_problem(path, array.shape, array.dtype)

    with atomic_path(target, suffix=".npy", check=check) as tmp:
        np.save(tmp, array, allow_pickle=False)


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib figure drawn off screen, outside pyplot: making and saving it never switches
    the caller's backend (a notebook keeps its inline figures) and it needs no closing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def write_figure_atomic(fig: Any, target: str | os.PathLike, **savefig: Any) -> None:
    """Save a matplotlib figure to ``target`` atomically (rendered in memory first, so the
    file's byte count is known and checked, and a PNG's structure too)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, **savefig)
    write_bytes_atomic(target, buffer.getvalue())


def write_via_library(
    target: str | os.PathLike,
    write: Callable[[Path], None],
    check: Check,
    companions: bool = False,
) -> None:
    """Let a library write ``target`` in a temporary folder beside it, check it, then rename it
    (with ``companions``: and every other file the library wrote there, such as a MetaImage's
    pixel file, first) into place.

    Some libraries do not report a failed write: NIfTI's prints a line on stderr and returns,
    leaving a cut-off file. So what the library prints on file descriptor 2 meanwhile is caught
    (and passed on when all went well), the written files are flushed to the disk, and
    ``check`` must find the result whole before anything is replaced. A ``RuntimeError`` of
    the library (SimpleITK's way to fail), an ``OSError`` or a problem found by ``check`` is a
    :class:`WriteError` naming ``target``; ``target`` and its companions are then left as they
    were.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise cannot_write(target, exc) from None
    try:
        tmp_target = tmpdir / target.name
        with library_stderr() as said:
            try:
                write(tmp_target)
                failure = None
            except RuntimeError as exc:
                failure = f"cannot be written ({_library_reason(str(exc))})"
        if failure:
            raise WriteError(target, failure)
        written = sorted(tmpdir.iterdir())
        for path in written:
            flush_to_disk(path)
        problem = check(tmp_target)
        if problem:
            raise WriteError(target, f"{problem}; nothing was replaced")
        if said:
            os.write(2, "".join(f"{line}\n" for line in said).encode("utf-8", "replace"))
        if companions:
            for path in written:
                if path != tmp_target:
                    os.replace(path, target.parent / path.name)
        os.replace(tmp_target, target)
    except OSError as exc:
        raise cannot_write(target, exc) from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _library_reason(message: str) -> str:
    """The useful line of a library's multi-line error (ITK: ``Reason: File too large``)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Reason:"):
            return line[len("Reason:") :].strip()
    return (lines[-1] if lines else "unknown error")[:160]


_STDERR_LOCK = threading.Lock()
"""One redirection of file descriptor 2 at a time (two threads would restore each other's)."""


@contextlib.contextmanager
def library_stderr() -> Iterator[list[str]]:
    """Catch the lines C code writes on file descriptor 2 inside the block (into the yielded
    list, filled when the block ends), so a library's own failure notice does not reach the
    user next to the one-line error that replaces it."""
    lines: list[str] = []
    with _STDERR_LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to protect
            yield lines
            return
        try:
            caught = tempfile.TemporaryFile()
        except OSError:
            os.close(saved)
            yield lines
            return
        with caught:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(caught.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                caught.seek(0)
                lines.extend(caught.read().decode("utf-8", "replace").splitlines())


# ----------------------------------------------------------------------------------------------
# Checks of written files
# ----------------------------------------------------------------------------------------------


def _no_check(path: Path) -> str | None:
    return None


def check_for(target: str | os.PathLike) -> Check:
    """The check of ``target``'s format: PNG signature and end chunk; ``.npy`` header against
    the file's length; ``.npz`` central directory; none for other formats."""
    name = Path(target).name.lower()
    if name.endswith(".png"):
        return png_problem
    if name.endswith(".npy"):
        return npy_problem
    if name.endswith(".npz"):
        return npz_problem
    return _no_check


def size_problem(path: str | os.PathLike, expected: int) -> str | None:
    """Whether the file holds ``expected`` bytes."""
    actual = os.stat(path).st_size
    if actual != expected:
        return f"was not written whole ({actual} of {expected} bytes)"
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def png_problem(path: str | os.PathLike) -> str | None:
    """Whether the file starts with the PNG signature and ends with the IEND chunk."""
    with open(path, "rb") as f:
        head = f.read(len(_PNG_SIGNATURE))
        if len(head) < len(_PNG_SIGNATURE):
            return "was not written whole (too short to be a PNG)"
        f.seek(max(0, os.fstat(f.fileno()).st_size - len(_PNG_END)))
        tail = f.read()
    if head != _PNG_SIGNATURE or tail != _PNG_END:
        return "was not written whole (not a complete PNG)"
    return None


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(shape), np.dtype(dtype), f.tell()


def npy_problem(
    path: str | os.PathLike,
    shape: Sequence[int] | None = None,
    dtype: np.dtype | None = None,
) -> str | None:
    """What is wrong with a ``.npy`` file: an unreadable header, a length other than header +
    data, or (when given) another shape or dtype. Reads the header only."""
    try:
        with open(path, "rb") as f:
            found_shape, found_dtype, offset = _npy_header(f)
            size = os.fstat(f.fileno()).st_size
    except (ValueError, EOFError) as exc:
        return f"is not a complete .npy file ({exc})"
    if found_dtype.hasobject:
        return "holds Python objects, not numbers"
    if shape is not None and found_shape != tuple(shape):
        return f"holds shape {list(found_shape)}, not {list(shape)}"
    if dtype is not None and found_dtype != np.dtype(dtype):
        return f"holds {found_dtype}, not {np.dtype(dtype)}"
    expected = offset + int(np.prod(found_shape, dtype=np.int64)) * found_dtype.itemsize
    if size != expected:
        return (
            f"has {size} bytes but its header {list(found_shape)} x {found_dtype} needs {expected}"
        )
    return None


def npz_problem(path: str | os.PathLike) -> str | None:
    """Whether a ``.npz`` (zip) file is complete: its central directory, written last, reads
    and every member lies inside the file."""
    try:
        with zipfile.ZipFile(path) as zf:
            size = os.stat(path).st_size
            for info in zf.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"was not written whole (member {info.filename} is cut off)"
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        return f"was not written whole ({exc})"
    return None


def image_problem(path: str | os.PathLike, size_xyz: Sequence[int], data_bytes: int) -> str | None:
    """What is wrong with a just-written MetaImage or NIfTI file of ``size_xyz`` voxels and
    ``data_bytes`` bytes of pixel data: its header is read again by the suite's reader
    (:mod:`lungct.headers`), must state that size, and its data must have the byte count the
    header says (compressed MetaImage: ``CompressedDataSize``, else the inflated length;
    ``.nii.gz``: the decompressed length)."""
    name = Path(path).name.lower()
    size = tuple(size_xyz)
    # The voxel limit guards against untrusted files; this one was just written from memory.
    try:
        if name.endswith((".mhd", ".mha")):
            meta = read_metaimage_header(path, max_voxels=sys.maxsize)
            if meta.size != size:
                return f"header says DimSize {list(meta.size)}, not {list(size)}"
            if meta.nbytes != data_bytes:
                return f"header describes {meta.nbytes} bytes of pixel data, not {data_bytes}"
            if not meta.length_stated:
                check_metaimage_data(meta)
        elif name.endswith((".nii", ".nii.gz")):
            nifti = read_nifti_header(path, max_voxels=sys.maxsize)
            if nifti.size != size:
                return f"header says size {list(nifti.size)}, not {list(size)}"
            if nifti.file_bytes - nifti.vox_offset != data_bytes:
                return (
                    f"header describes {nifti.file_bytes - nifti.vox_offset} bytes of pixel "
                    f"data, not {data_bytes}"
                )
    except LungCTError as exc:
        return exc.problem
    return None


# ----------------------------------------------------------------------------------------------
# Folders of outputs
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_outputs(
    folder: str | os.PathLike, marker: str, stale: Sequence[str] = ()
) -> Iterator[Path]:
    """Yield an empty staging folder inside ``folder``; publish its files there on success.

    A command that writes several files must never leave a mix of old and new ones that looks
    complete. The body writes everything (each file checked by the atomic writers) into the
    staging folder, so a failure there leaves ``folder`` exactly as it was. Publishing then
    removes the old ``marker`` (the file whose presence says the set is complete), renames the
    new files in, removes files matching the ``stale`` patterns that this run did not write
    (only where the old marker said they came from a complete earlier run), and renames the new
    marker in last: an interruption while publishing leaves no marker, i.e. an incomplete set.

    Errors that name a file in the staging folder are raised naming its place in ``folder``;
    a ``folder`` this call created is removed again after a failure. Staging folders left by
    a killed writer (its pid no longer running) are removed.
    """
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(
            folder, f"cannot create the output folder ({exc.strerror or exc})"
        ) from None
    remove_abandoned_stages(folder)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=folder))
    except OSError as exc:
        raise WriteError(folder, f"folder cannot be written ({exc.strerror or exc})") from None
    try:
        try:
            yield stage
        except LungCTError as exc:
            moved = _unstaged(exc.path, stage, folder)
            if moved is None:
                raise
            kind = WriteError if isinstance(exc, WriteError) else LungCTError
            raise kind(moved, exc.problem) from None
        except OSError as exc:
            moved = _unstaged(exc.filename, stage, folder)
            if moved is None:
                raise
            raise cannot_write(moved, exc) from None
        _publish(stage, folder, marker, stale)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty: a folder of nothing is not an output
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _unstaged(path: Any, stage: Path, folder: Path) -> Path | None:
    """Where a path inside the staging folder will be published (None: not inside it)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None
    try:
        return folder / Path(os.fsdecode(path)).relative_to(stage)
    except ValueError:
        return None


def _publish(stage: Path, folder: Path, marker: str, stale: Sequence[str]) -> None:
    names = sorted(p.name for p in stage.iterdir())
    if marker not in names:
        raise ValueError(f"the outputs written into {folder} lack their marker {marker}")
    old_marker = folder / marker
    had_marker = old_marker.is_file()
    current = folder
    try:
        if had_marker:
            current = old_marker
            old_marker.unlink()
        for name in names:
            if name != marker:
                current = folder / name
                os.replace(stage / name, current)
        if had_marker:
            for pattern in stale:
                for old in folder.glob(pattern):
                    if old.is_file() and old.name not in names:
                        current = old
                        old.unlink()
        current = old_marker
        os.replace(stage / marker, old_marker)
    except OSError as exc:
        raise cannot_write(current, exc) from None


def remove_abandoned_stages(folder: str | os.PathLike) -> None:
    """Remove the staging folders in ``folder`` whose writer (the pid in the name) has ended:
    what a killed :func:`staged_outputs` leaves behind."""
    for stage in Path(folder).glob(f"{STAGE_PREFIX}*"):
        pid_text = stage.name[len(STAGE_PREFIX) :].split("-", 1)[0]
        if not stage.is_dir() or not pid_text.isdigit() or _running(int(pid_text)):
            continue
        shutil.rmtree(stage, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_json(
    path: str | os.PathLike,
    missing: str = "file not found",
    missing_where: str | os.PathLike | None = None,
) -> Any:
    """Parse a JSON file. A missing, unreadable or malformed file is a :class:`LungCTError`
    naming it (``missing`` is the message for a missing one, reported against
    ``missing_where`` when given)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LungCTError(path if missing_where is None else missing_where, missing) from None
    except OSError as exc:
        raise LungCTError(path, f"cannot be read ({exc.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LungCTError(path, f"is not valid JSON ({exc.msg}, line {exc.lineno})") from None
