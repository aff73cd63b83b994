"""TensorFlow without its start-up chatter: what every command calls before TensorFlow loads.

On a machine without a GPU, ``import tensorflow`` and its first use print lines such as::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796470333.392212   28579 cudart_stub.cc:31] Could not find cuda drivers ...
    E0000 00:00:1796470339.277213   28579 cuda_platform.cc:52] failed call to cuInit: ...

The ``cuInit`` line (and the CPU-feature notice) obey ``TF_CPP_MIN_LOG_LEVEL``. The first two do
not: the CUDA stub writes them while TensorFlow's shared libraries load, before anything reads
that variable (``GLOG_minloglevel`` and ``CUDA_VISIBLE_DEVICES`` do not silence them either). So
:func:`quiet_tensorflow` also arranges that the first ``import tensorflow`` runs with file
descriptor 2 sent to a temporary file; afterwards every line written there is passed on to the
real stderr unless it is such a log line below ``TF_CPP_MIN_LOG_LEVEL`` (a Python traceback or
anything else printed meanwhile still shows). ``TF_CPP_MIN_LOG_LEVEL=0`` shows everything.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

QUIET_LEVEL = "3"
"""``TF_CPP_MIN_LOG_LEVEL`` the commands use unless it is set: errors included (the failed
``cuInit`` of a CPU machine is logged as an error)."""

_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]\s]+:\d+\] ")
_PRE_INIT_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called"
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}


def quiet_tensorflow() -> None:
    """Pick the TensorFlow backend and silence TensorFlow's C++ start-up lines on stderr.

    Call before TensorFlow is first imported (it does not import it). The variables are only
    set where the user has not set them. Calling it again does nothing more.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_LEVEL)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


def min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as a number (0 = everything is shown)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def is_startup_noise(line: str, level: int) -> bool:
    """Whether ``line`` is a C++ log line (or absl's pre-init notice) below ``level``."""
    if line.startswith(_PRE_INIT_NOTICE):
        return level >= 1
    match = _ABSL_LINE.match(line)
    return bool(match) and _SEVERITY[match.group(1)] < level


@contextlib.contextmanager
def filtered_stderr(level: int | None = None) -> Iterator[None]:
    """Send file descriptor 2 to a temporary file; then pass on all but the start-up noise."""
    level = min_log_level() if level is None else level
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        yield
        return
    with tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = caught.read().decode("utf-8", "replace")
            kept = [ln for ln in text.splitlines(True) if not is_startup_noise(ln, level)]
            if kept:
                os.write(2, "".join(kept).encode("utf-8", "replace"))


class _FilteredLoader(importlib.abc.Loader):
    """Runs the wrapped loader's ``exec_module`` inside :func:`filtered_stderr`."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            with filtered_stderr():
                self._inner.exec_module(module)
        finally:
            module.__loader__ = self._inner
            if module.__spec__ is not None:
                module.__spec__.loader = self._inner

    def __getattr__(self, name: str):
        """Everything else is the real loader's (``get_resource_reader``, ...)."""
        return getattr(self._inner, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of the first top-level ``tensorflow`` import."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow" or path is not None:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _FilteredLoader(spec.loader)
        return spec
