"""Config helpers: dataclasses built from dicts or YAML, rejecting unknown keys so a typo fails loudly."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from boxprobe.errors import BoxprobeError

T = TypeVar("T")


class ConfigError(BoxprobeError, ValueError):
    """A config file or dict that does not fit its dataclass."""


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise with a close-match suggestion.

    Nested dataclass fields are built recursively and lists become tuples where the field is a tuple.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, fields, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {', '.join(hints)}. "
                          f"Known keys: {', '.join(fields)}.")
    hints_by_name = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kind = hints_by_name.get(key)
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = from_dict(kind, value, where=f"{where or cls.__name__}.{key}")
        elif typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
            item_kind = typing.get_args(kind)[0] if typing.get_args(kind) else None
            if dataclasses.is_dataclass(item_kind):
                value = tuple(from_dict(item_kind, v, where=f"{where or cls.__name__}.{key}[{i}]")
                              if isinstance(v, dict) else v for i, v in enumerate(value))
            else:
                value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def load_yaml_config(cls: type[T], path: str | Path) -> T:
    """Read a YAML file into dataclass ``cls``; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No config file at {path}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return from_dict(cls, data, where=str(path))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)
