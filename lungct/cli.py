"""The one way every command of the suite runs: ``python -m <package> VERB ...``.

A :class:`~lungct.errors.LungCTError` (bad input: the file and the problem) ends the command
with that one line on stderr and exit status 2, never a traceback; so does an ``OSError`` (a full
disk, a folder that cannot be written) and a bad option (``--batch-size 0``: argparse's message,
on one line, without the usage text). Ctrl-C ends it with 130. TensorFlow's C++ start-up lines
are kept off stderr (:mod:`lungct.quiet`).

The option types below (:func:`positive_int`, ...) refuse a number out of range while the
options are parsed, so a zero batch size or a negative budget never reaches the code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from lungct.errors import LungCTError
from lungct.quiet import quiet_tensorflow

__all__ = [
    "fraction",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "quiet_tensorflow",
    "run_command",
]


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if kind is float and value != value:  # NaN compares false with every bound
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def positive_int(text: str) -> int:
    """An option type: an integer >= 1 (a batch size, a count of epochs, steps or workers)."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An option type: an integer >= 0 (a seed, a count where 0 means none)."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """An option type: a finite number > 0 (minutes, millimetres)."""
    value = float(_number(text, float))
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An option type: a finite number >= 0."""
    value = float(_number(text, float))
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    """An option type: a number from 0 to 1 (a probability threshold, a share)."""
    value = float(_number(text, float))
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}")
    return value


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` and its sub-parsers report a bad option as one ``error:`` line."""

    def error(message: str, prog: str = parser.prog) -> NoReturn:
        print(f"error: {prog}: {message} (see {prog} --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _one_line_errors(sub)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the verb's ``func(args)``; returns the exit status.

    Every sub-parser sets ``func`` with ``set_defaults``; its return value (``None`` = 0) is
    the exit status. TensorFlow, should the verb load it, starts quietly
    (:func:`lungct.quiet.quiet_tensorflow`).
    """
    quiet_tensorflow()
    _one_line_errors(parser)
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
