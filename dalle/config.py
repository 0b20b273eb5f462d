"""Config files: YAML sections parsed into frozen dataclasses with strict key checking.

A config file has one section per dataclass (`model:`, `train:`, `data:`, ...). Keys are the
dataclass field names, which are also the CLI's `--set section.key=value` overrides and the keys
saved in checkpoints: one vocabulary everywhere.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML: 1e-3, true, [0.9, 0.96])."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    return data


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
