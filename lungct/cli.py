"""The one way every command of the suite runs: ``python -m <package> VERB ...``.

A :class:`~lungct.errors.LungCTError` (bad input: the file and the problem) ends the command
with that one line on stderr and exit status 2, never a traceback; so does an ``OSError`` (a full
disk, a folder that cannot be written). Ctrl-C ends it with 130. TensorFlow's C++ start-up lines
are kept off stderr (:mod:`lungct.quiet`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lungct.errors import LungCTError
from lungct.quiet import quiet_tensorflow

__all__ = ["quiet_tensorflow", "run_command"]


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the verb's ``func(args)``; returns the exit status.

    Every sub-parser sets ``func`` with ``set_defaults``; its return value (``None`` = 0) is
    the exit status. TensorFlow, should the verb load it, starts quietly
    (:func:`lungct.quiet.quiet_tensorflow`).
    """
    quiet_tensorflow()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LungCTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The machine, not the input: a full disk, a read-only or vanished folder. Say which
        # file and what happened in one line, like bad input (the write was atomic, so nothing
        # already written is damaged).
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
