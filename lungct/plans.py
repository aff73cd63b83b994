"""A plan is a frozen dataclass that round-trips through a JSON file a person can edit.

:class:`JSONPlan` gives a plan dataclass its JSON form (tuples as lists), strict loading (an
unknown key is an error: a typo must not silently fall back to a default), atomic saving and
checked copies. The stages' plans (the MGI-CNN's, the CT-GAN's) inherit it; their
``__post_init__`` does the value checks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic

P = TypeVar("P", bound="JSONPlan")

PLAN_FORMAT = 1
"""Version of the plan files this suite writes; ``plan_format`` in a plan file."""
PLAN_FORMAT_KEY = "plan_format"


def with_plan_format(d: dict) -> dict:
    """A plan's JSON form as saved: the format version first, then the plan's fields."""
    return {PLAN_FORMAT_KEY: PLAN_FORMAT, **d}


def check_format_version(value: Any, supported: int, source: str | Path | None, what: str) -> None:
    """Refuse a file format version that is not an integer or is newer than ``supported``.

    A newer file's fields may mean something this version does not know; guessing would train
    or detect with the wrong settings. ``what`` names the format in the message.

    Raises:
        LungCTError: naming ``source``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise LungCTError(source, f"{what} must be an integer, got {value!r}")
    if value > supported:
        raise LungCTError(
            source,
            f"written by a newer version of the suite ({what} {value}; this version reads up "
            f"to {supported}): upgrade the suite to use it",
        )


def pop_plan_format(d: dict, source: str | Path | None = None) -> dict:
    """The plan fields of a loaded plan file, after checking its format version.

    A plan without ``plan_format`` (hand-written, or from before plans carried it) is read as
    the current format.

    Raises:
        LungCTError: a format that is not an integer, or newer than :data:`PLAN_FORMAT`.
    """
    if not isinstance(d, dict) or PLAN_FORMAT_KEY not in d:
        return d
    d = dict(d)
    check_format_version(d.pop(PLAN_FORMAT_KEY), PLAN_FORMAT, source, "plan format")
    return d


def to_json_value(value: Any) -> Any:
    """Tuples (nested too) become lists; everything else is already JSON."""
    if isinstance(value, tuple):
        return [to_json_value(v) for v in value]
    return value


class JSONPlan:
    """JSON round trip for a (frozen) dataclass plan."""

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {k: to_json_value(v) for k, v in dataclasses.asdict(self).items()}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[P], d: dict, source: str | Path | None = None) -> P:
        """Inverse of :meth:`to_dict`; an unknown key is an error (a typo must not pass)."""
        d = pop_plan_format(d, source)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
        if unknown:
            raise LungCTError(source, f"unknown plan keys {unknown}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise LungCTError(source, f"bad plan: {exc}") from None

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (with its format version), atomically."""
        write_json_atomic(path, with_plan_format(self.to_dict()))

    @classmethod
    def load(cls: type[P], path: str | Path) -> P:
        """Read a plan written by :meth:`save` (or by hand)."""
        path = Path(path)
        data = read_json(path, "plan file not found")
        if not isinstance(data, dict):
            raise LungCTError(path, "a plan must be a JSON object")
        return cls.from_dict(data, source=path)

    def replace(self: P, **changes: Any) -> P:
        """A copy with some fields changed (``None`` values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})  # type: ignore[arg-type]
        if unknown:
            raise LungCTError(None, f"unknown plan keys {unknown}")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
