"""Crash-safe writing (write to a temporary file beside the target, then rename over it), and
reading JSON files with errors that name the file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lungct.errors import LungCTError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    If the body raises, the temporary file is removed and ``target`` is left as it was.
    ``suffix`` defaults to the target's own suffixes so libraries that pick a format from the
    extension (SimpleITK, numpy) still do the right thing.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json_atomic(target: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npy_atomic(target: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array as ``.npy`` (memory-mappable, no pickle) atomically."""
    with atomic_path(target, suffix=".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)


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
