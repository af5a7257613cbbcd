"""A small declarative validator for TOML settings and instrument profiles.

A schema is a ``dict`` mapping each allowed key to a *spec*:

- a Python type or tuple of types (``float`` also accepts ``int``; ``bool`` is never a number),
- :class:`Table` (a nested table with its own keys),
- :class:`ListOf` (an array whose items follow a spec),
- :class:`MapOf` (a table with free keys whose values follow a spec),
- :class:`OneOf` (a string among fixed choices),
- :class:`Either` (any of several specs).

Every problem is reported as one line naming the file, the dotted key and what is allowed,
e.g. ``reducer.toml: [site] unknown key 'longitud' (allowed: height, latitude, longitude,
name, timezone)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class SchemaError(ValueError):
    """A settings file or instrument profile does not follow its schema."""


@dataclass(frozen=True)
class Table:
    keys: dict
    required: tuple = ()


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class MapOf:
    value: Any


@dataclass(frozen=True)
class OneOf:
    choices: tuple


@dataclass(frozen=True)
class Either:
    specs: tuple
    name: str = field(default="")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
               dict: "a table", list: "an array"}


def describe(spec) -> str:
    """Human description of what a spec allows."""
    if isinstance(spec, tuple):
        return " or ".join(describe(s) for s in spec)
    if isinstance(spec, type):
        return _TYPE_NAMES.get(spec, spec.__name__)
    if isinstance(spec, Table):
        return "a table"
    if isinstance(spec, ListOf):
        plural = {str: "strings", int: "integers", float: "numbers", bool: "true/false values"}
        inner = plural.get(spec.item) if isinstance(spec.item, type) else None
        return f"an array of {inner or describe(spec.item)}"
    if isinstance(spec, MapOf):
        return f"a table of {describe(spec.value)}"
    if isinstance(spec, OneOf):
        return "one of " + ", ".join(repr(c) for c in spec.choices)
    if isinstance(spec, Either):
        return spec.name or " or ".join(describe(s) for s in spec.specs)
    return repr(spec)


def _typename(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    for t, name in _TYPE_NAMES.items():
        if isinstance(value, t):
            return name
    return type(value).__name__


def _where(path: str) -> str:
    return f"'{path}'" if path else "the top level"


def _check(value, spec, path: str, errors: list[str]) -> None:
    if isinstance(spec, Table):
        if not isinstance(value, dict):
            errors.append(f"{_where(path)} must be a table, not {_typename(value)}")
            return
        validate_table(value, spec, path, errors)
    elif isinstance(spec, ListOf):
        if not isinstance(value, list):
            errors.append(f"{_where(path)} must be {describe(spec)}, not {_typename(value)} {value!r}")
            return
        for i, item in enumerate(value):
            _check(item, spec.item, f"{path}[{i}]", errors)
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict):
            errors.append(f"{_where(path)} must be {describe(spec)}, not {_typename(value)}")
            return
        for k, v in value.items():
            _check(v, spec.value, f"{path}.{k}" if path else k, errors)
    elif isinstance(spec, OneOf):
        if value not in spec.choices:
            errors.append(f"{_where(path)} is {value!r}; allowed: {describe(spec)}")
    elif isinstance(spec, Either):
        for sub in spec.specs:
            trial: list[str] = []
            _check(value, sub, path, trial)
            if not trial:
                return
        errors.append(f"{_where(path)} must be {describe(spec)}, not {_typename(value)} {value!r}")
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        ok = False
        for t in types:
            if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                ok = True
            elif t is int and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            elif t is bool and isinstance(value, bool):
                ok = True
            elif t not in (int, float, bool) and isinstance(value, t):
                ok = True
        if not ok:
            errors.append(f"{_where(path)} must be {describe(spec)}, not {_typename(value)} {value!r}")


def validate_table(data: dict, spec: Table, path: str, errors: list[str]) -> None:
    """Validate one table against a :class:`Table` spec, appending problems to ``errors``."""
    for key, value in data.items():
        sub = f"{path}.{key}" if path else key
        if key not in spec.keys:
            import difflib
            allowed = ", ".join(sorted(spec.keys))
            where = f"[{path}] " if path else ""
            near = difflib.get_close_matches(key, list(spec.keys), n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            errors.append(f"{where}unknown key '{key}' ({hint}allowed: {allowed})")
            continue
        _check(value, spec.keys[key], sub, errors)
    for key in spec.required:
        if key not in data:
            where = f"[{path}] " if path else ""
            errors.append(f"{where}missing required key '{key}'")


def validate(data: dict, spec: Table, source: str) -> None:
    """Raise :class:`SchemaError` listing every problem of ``data``, each line prefixed by ``source``.

    Parameters
    ----------
    data : dict
        Parsed TOML.
    spec : Table
        The schema.
    source : str
        File name used in messages.
    """
    errors: list[str] = []
    validate_table(data, spec, "", errors)
    if errors:
        raise SchemaError("\n".join(f"{source}: {e}" for e in errors))
