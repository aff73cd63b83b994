"""Small helpers for the teaching labs (``labs/*.ipynb``).

The labs call the suite's own functions and commands; this module only holds what every lab
needs around them: whether to run in the tiny quick mode the tests use, how big a run to make,
and how to run a ``python -m`` command of the suite from a notebook so that a failure stops the
notebook instead of scrolling past. Example::

    from lungct.labs import quick_mode, run_mode, run_module

    mode = run_mode(big_run=False)            # 'quick' under LUNGCT_LABS_QUICK=1, else 'normal'
    run_module("lungct", "synth", "--out", "data", "--scans", "2", "--quiet")
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

QUICK_ENV = "LUNGCT_LABS_QUICK"
"""Environment variable that selects quick mode: tiny data and a few steps (the tests set it)."""

RUN_MODES = ("quick", "normal", "big")
"""What :func:`run_mode` returns: tiny (tests), what a student runs on a laptop, a GPU run."""

_FALSE = ("", "0", "false", "no", "off")


def quick_mode() -> bool:
    """Whether ``LUNGCT_LABS_QUICK`` asks for quick mode (any value but ``0``/``false``/empty).

    Quick mode is what ``make test`` runs: each lab on tiny data in well under a minute, to
    check that it still runs, not to teach. A student never needs it.
    """
    return os.environ.get(QUICK_ENV, "").strip().lower() not in _FALSE


def run_mode(big_run: bool = False) -> str:
    """The size of run a lab makes: ``'quick'``, ``'normal'`` or ``'big'``.

    Args:
        big_run: the lab's ``BIG_RUN`` switch (more data, more steps; meant for a GPU).

    Returns:
        ``'quick'`` whenever :func:`quick_mode` is on (the tests win over the switch),
        otherwise ``'big'`` or ``'normal'`` as ``big_run`` says.
    """
    if quick_mode():
        return "quick"
    return "big" if big_run else "normal"


def run_module(module: str, *args: str | os.PathLike, echo: bool = True) -> str:
    """Run ``python -m <module> <args>`` with this Python, as a lab's shell cell would.

    The command line and its standard output are printed (so the notebook shows what a
    terminal would), and a failure raises instead of scrolling past: a lab that runs top to
    bottom without an error really did every step.

    Args:
        module: the suite's package to run, e.g. ``"lungct"`` or ``"integration"``.
        *args: its arguments; paths may be :class:`pathlib.Path`.
        echo: print the command line and its output.

    Returns:
        The command's standard output.

    Raises:
        RuntimeError: the command exited with a non-zero status; the message holds the last
            lines of its standard error (for the suite's commands, the one-line reason).
    """
    argv = [sys.executable, "-m", module, *(os.fspath(a) for a in args)]
    shown = shlex.join(["python", "-m", module, *argv[3:]])
    if echo:
        print(f"$ {shown}", flush=True)
    done = subprocess.run(argv, capture_output=True, text=True, cwd=Path.cwd(), check=False)
    if echo and done.stdout:
        print(done.stdout, end="" if done.stdout.endswith("\n") else "\n", flush=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"`{shown}` exited with status {done.returncode}: {tail}")
    return done.stdout
