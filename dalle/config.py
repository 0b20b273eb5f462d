"""Frozen config dataclasses to and from plain dicts, with strict key checking.

Every model's config is a frozen dataclass; its field names are the keys of config.json in a model
directory, of the YAML sections of `dalle.train.config`, and of the CLI's `--set section.key=value`
overrides: one vocabulary everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from `values`, rejecting unknown keys with the list of valid ones."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        hint, key = hints.get(name), f"{where or cls.__name__}.{name}"
        # YAML gives lists where the dataclass wants tuples (hashable, frozen).
        if isinstance(value, list) and "tuple" in str(hint):
            values[name] = tuple(value)
        elif value is None:
            continue
        elif hint in (float, float | None):
            values[name] = _number(value, key)
        elif hint in (int, int | None):
            values[name] = _integer(value, key)
        elif hint is bool and not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
    return cls(**values)


def _number(value: Any, key: str) -> float | int:
    # YAML 1.1 reads 3e-4 (no dot) as a string; a float field takes it as the number it means.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    raise ValueError(f"{key}: expected a number, got {value!r}")


def _integer(value: Any, key: str) -> int:
    # A whole number written as 1e4 or 2000.0 is the integer it means; anything else would fail later, far from
    # the key that caused it (a comparison with a string, a float step count).
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{key}: expected an integer, got {value!r}")


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
