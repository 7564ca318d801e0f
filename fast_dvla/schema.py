"""Checking settings against the fields that hold them: every key known (an unknown one is refused
with the nearest known name, since a misspelt setting would otherwise be silently dropped), every
value of its field's type (a bool is not a count, ``"0.5"`` is not a number, null is not a mapping,
numbers are finite), and every error naming the file and the field path at fault."""
from __future__ import annotations

import difflib
import functools
import json
import math
import types
import typing
from dataclasses import fields


class ConfigError(ValueError):
    """A bad setting. ``field`` is its path (``model.block_size``; None for the whole file) and
    ``file`` where it was read from (None for a value given in Python); the message reads
    ``file: field: problem``."""

    def __init__(self, problem: str, field: str | None = None, file: str | None = None):
        self.problem, self.field, self.file = problem, field, file
        super().__init__(": ".join(part for part in (file, field, problem) if part))

    def within(self, file: str | None = None, parent: str | None = None) -> "ConfigError":
        """This error as met while reading ``file``, its field nested under ``parent``."""
        path = ".".join(part for part in (parent, self.field) if part) or None
        return ConfigError(self.problem, path, self.file or file)


def read_json(path: str):
    """The JSON document at ``path``; one that does not parse is a ``ConfigError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"not valid JSON ({e})", file=path) from None


# -- values -------------------------------------------------------------------
def describe(kind) -> str:
    """``kind`` (a type annotation) in words, for an error message."""
    options = typing.get_args(kind) if _is_union(kind) else ()
    if options:
        return " or ".join(describe(option) for option in options)
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if kind is type(None):
        return "null"
    if origin in (list, tuple):
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            dict: "a mapping"}.get(origin, getattr(origin, "__name__", str(origin)))


def shown(value) -> str:
    """``value`` as an error message shows it, saying what it is where its repr does not."""
    if isinstance(value, str):
        return f"{value!r} (a string{_number_hint(value)})"
    if isinstance(value, bool):
        return f"{value!r} (a bool)"
    if value is None:
        return "null"
    return repr(value)


def _number_hint(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    if "e" in text.lower() and "." not in text:  # YAML 1.1 wants the point: 1e-3 is text, 1.0e-3 a number
        return ", not a number: in YAML write an exponent with a decimal point, like 1.0e-3"
    return ", not a number: write it unquoted"


def check_value(value, kind, field: str | None = None) -> None:
    """Raises ``ConfigError`` at ``field`` (``field[i]`` for a list's entry) unless ``value`` is of
    ``kind``: ``int`` (not a bool), ``float`` (a finite int or float, not a bool), ``bool``, ``str``,
    ``dict``, ``list[X]`` / ``tuple[X, ...]`` (a list or tuple), ``X | None``."""
    if _is_union(kind):
        if not any(_matches(value, option) for option in typing.get_args(kind)):
            raise ConfigError(f"expected {describe(kind)}, got {shown(value)}", field)
        return
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        for i, entry in enumerate(value):
            check_value(entry, args[0], f"{field or ''}[{i}]")
        return
    if not _matches(value, kind):
        raise ConfigError(f"expected {describe(kind)}, got {shown(value)}", field)


def _matches(value, kind) -> bool:
    if _is_union(kind):
        return any(_matches(value, option) for option in typing.get_args(kind))
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if kind is type(None):
        return value is None
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(_matches(entry, args[0]) for entry in value))
    return isinstance(value, origin)


def _is_union(kind) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _plural(words: str) -> str:
    return {"an integer": "integers", "a finite number": "finite numbers", "a string": "strings"}.get(words, words)


# -- mappings -----------------------------------------------------------------
def unknown_key_problem(key, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"expected one of {sorted(known)}"
    return f"unknown key; {hint} (unknown keys are refused rather than ignored)"


def check_mapping(data, known, field: str | None = None) -> None:
    """``data`` is a mapping whose keys are all among ``known``."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of settings, got {shown(data)}", field)
    for key in data:
        if key not in known:
            raise ConfigError(unknown_key_problem(key, known), _join(field, key))


def check_entries(data, kinds: dict, required=(), field: str | None = None) -> None:
    """``data`` is a mapping of some of ``kinds``' keys, with at least ``required``, each value of
    its kind (see ``check_value``)."""
    check_mapping(data, kinds, field)
    for key in required:
        if key not in data:
            raise ConfigError(f"missing (expected {describe(kinds[key])})", _join(field, key))
    for key, value in data.items():
        check_value(value, kinds[key], _join(field, key))


def _join(parent: str | None, key) -> str:
    return f"{parent}.{key}" if parent else str(key)


# -- dataclasses ----------------------------------------------------------------
@functools.cache
def field_kinds(cls) -> dict:
    """``{field name: its type}`` of dataclass ``cls``, with the annotations resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def check_fields(instance) -> None:
    """Every field of dataclass ``instance`` holds a value of its annotated type (``check_value``);
    called from ``__post_init__``, so the Python API refuses what a file may not hold."""
    for name, kind in field_kinds(type(instance)).items():
        check_value(getattr(instance, name), kind, name)


def from_mapping(cls, data):
    """``cls(**data)`` once ``data`` is a mapping of ``cls``'s fields (missing ones take their
    defaults); its own checks run in ``__post_init__``."""
    check_mapping(data, field_kinds(cls))
    return cls(**data)


def check_choice(value, choices, field: str, what: str | None = None) -> None:
    """``value`` (of ``field``, a ``what``) is one of ``choices``; otherwise says which are, and
    the nearest."""
    if value in choices:
        return
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{what or field} must be one of {tuple(choices)}, got {shown(value)}{hint}", field)


def check_at_least(instance, names, least) -> None:
    """Each of the int fields ``names`` of ``instance`` is ``>= least``."""
    for name in names:
        value = getattr(instance, name)
        if value is not None and value < least:
            raise ConfigError(f"expected an integer >= {least}, got {value!r}", name)
