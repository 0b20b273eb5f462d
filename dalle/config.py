"""Frozen config dataclasses to and from plain dicts, with strict key checking.

Every model's config is a frozen dataclass; its field names are the keys of config.json in a model
directory, of the YAML sections of `dalle.train.config`, and of the CLI's `--set section.key=value`
overrides: one vocabulary everywhere.
"""

from __future__ import annotations

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
        # YAML gives lists where the dataclass wants tuples (hashable, frozen).
        hint = hints.get(name)
        if isinstance(value, list) and "tuple" in str(hint):
            values[name] = tuple(value)
        # YAML 1.1 reads 3e-4 (no dot) as a string; a float field takes it as the number it means.
        elif isinstance(value, str) and hint in (float, float | None):
            try:
                values[name] = float(value)
            except ValueError:
                raise ValueError(f"{where or cls.__name__}.{name}: expected a number, got {value!r}") from None
    return cls(**values)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
