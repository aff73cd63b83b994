"""One error type for every bad input the suite can meet.

Every message names the file (or table row) and the problem, so a command-line user sees one
line such as ``scan.mhd: pixel data file 'scan.raw' is missing`` instead of a library traceback.
"""

from __future__ import annotations

import os


class LungCTError(Exception):
    """A bad input or an impossible request, with the offending path in the message."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:
        # Rebuild from (path, problem) when the error crosses a process boundary.
        return (type(self), (self.path, self.problem))
