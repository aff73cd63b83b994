"""A plan is a frozen dataclass that round-trips through a JSON file a person can edit.

:class:`JSONPlan` gives a plan dataclass its JSON form (tuples as lists), strict loading (an
unknown key is an error: a typo must not silently fall back to a default; a value of the wrong
JSON type is an error naming the field and the type it needs, :func:`check_field_types`),
atomic saving and checked copies. The stages' plans (the MGI-CNN's, the CT-GAN's) inherit it; their
``__post_init__`` does the value checks.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

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


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The declared type of each field of the dataclass ``cls`` (annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def describe_type(tp: Any, plural: bool = False) -> str:
    """What a JSON value of the Python type ``tp`` looks like, in words (no article).

    ``int`` is "integer", ``tuple[float, float, float]`` "list of 3 numbers", ``str | None``
    "string or null": the words of the plan reference and of the wrong-type error.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    s = "s" if plural else ""
    if tp is Any:
        return "any JSON values" if plural else "any JSON value"
    if tp is bool:
        return "booleans (true or false)" if plural else "true or false"
    if tp is int:
        return f"integer{s}"
    if tp is float:
        return f"number{s}"
    if tp is str:
        return f"string{s}"
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        text = " or ".join(describe_type(a, plural) for a in options)
        return f"{text} or null" if len(options) < len(args) else text
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(set(args)) == 1:
                return f"list{s} of {len(args)} {describe_type(args[0], plural=True)}"
            return f"list{s} [{', '.join(describe_type(a) for a in args)}]"
        inner = describe_type(args[0], plural=True) if args else "values"
        return f"list{s} of {inner}"
    if origin is dict or tp is dict:
        if len(args) == 2 and args[1] is not Any:
            return f"JSON object{s} of {describe_type(args[1], plural=True)}"
        return f"JSON object{s}"
    return getattr(tp, "__name__", str(tp))


def _with_article(text: str) -> str:
    if text.startswith(("true ", "any ", "null")):
        return text
    return f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


def value_matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value (lists for tuples) fits the Python type ``tp``.

    Only types are checked: the length of a fixed-size list and the range of a number are
    the plan's own value checks, with their own messages.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(value_matches(value, a) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) == len(args):
                return all(value_matches(v, a) for v, a in zip(value, args, strict=True))
            return len(set(args)) == 1 and all(value_matches(v, args[0]) for v in value)
        return not args or all(value_matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return False
        if len(args) == 2:
            return all(isinstance(k, str) and value_matches(v, args[1]) for k, v in value.items())
        return True
    return True  # a type JSON cannot spell (a Path, ...): the plan's own checks decide


def check_field_types(cls: type, values: dict, source: str | Path | None = None) -> None:
    """Refuse a value whose JSON type does not fit its field, naming the field and the type.

    Keys that are not fields of ``cls`` are left to the caller (an unknown-key error).

    Raises:
        LungCTError: e.g. ``plan.json: epochs must be an integer, got 'forty'``.
    """
    check_value_types(field_types(cls), values, source)


def check_value_types(
    declared: dict[str, Any], values: dict, source: str | Path | None = None, prefix: str = ""
) -> None:
    """Refuse a value whose JSON type does not fit ``declared[key]`` (keys not declared pass).

    The JSON files the suite reads back (manifests, model sets) are checked with it before a
    value is used, so a hand-edited file fails with its field named, not deep inside the code.
    ``prefix`` names the enclosing object (``provenance.``).

    Raises:
        LungCTError: e.g. ``manifest.json: train_folds must be a list of integers, got 'zero'``.
    """
    for key, value in values.items():
        tp = declared.get(key)
        if tp is not None and not value_matches(value, tp):
            expected = _with_article(describe_type(tp))
            raise LungCTError(source, f"{prefix}{key} must be {expected}, got {_short_repr(value)}")


def key_list(keys: list[str], limit: int = 5) -> str:
    """``['a', 'b']``, or the first ``limit`` keys and how many more (a foreign file's keys
    would otherwise fill the error line)."""
    if len(keys) <= limit:
        return str(keys)
    return f"{keys[:limit]} and {len(keys) - limit} more"


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
            raise LungCTError(source, f"unknown plan keys {key_list(unknown)}")
        check_field_types(cls, d, source)
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
            raise LungCTError(None, f"unknown plan keys {key_list(unknown)}")
        check_field_types(type(self), changes)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
