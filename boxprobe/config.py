"""Config helpers: dataclasses built from dicts or YAML, rejecting unknown keys and values of the wrong
type, so a typo fails loudly and names the file, the key and what was expected."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, Union

import yaml

from boxprobe.errors import ConfigError, MissingFileError

__all__ = ["ConfigError", "check_choice", "from_dict", "load_yaml_config", "to_dict"]

T = TypeVar("T")

_NAMES = {str: "a str", int: "an int", float: "a number", bool: "a bool (true or false)", Path: "a path (str)"}


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


class _Mismatch(Exception):
    """Internal: ``value`` at ``key`` (the field, then ``[2]`` for an item) does not fit ``expected``."""

    def __init__(self, expected: str, value: Any, key: str) -> None:
        super().__init__(expected)
        self.expected, self.value, self.key = expected, value, key


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _NAMES:
        return _NAMES[hint]
    if hint is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')} values" if args else "a list"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    return getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any, where: str, key: str) -> Any:
    """``value`` checked against ``hint``: lists become tuples, mappings nested dataclasses.

    Raises _Mismatch, or ConfigError from a nested dataclass (which names its own keys)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, TypeVar):
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            try:
                return _convert(value, arm, where, key)
            except (_Mismatch, ConfigError) as err:
                error = err
        # Inside a list or a nested mapping, the inner error says more than "must be X or None".
        if len(arms) == 1 and (isinstance(error, ConfigError) or error.key != key):
            raise error
        raise _Mismatch(_describe(hint), value, key)
    if origin is Literal:
        # Compare types too: True == 1 == 1.0, but neither is the literal the config asks for.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch(_describe(hint), value, key)
    if origin in (tuple, list):
        variadic = not args or args[-1] is Ellipsis or origin is list
        if isinstance(value, str) and variadic and args and args[0] is str:
            value = (value,)  # a bare string means one name, not its characters
        if not isinstance(value, (list, tuple)) or (not variadic and len(value) != len(args)):
            raise _Mismatch(_describe(hint), value, key)
        kinds = (args[0] if args else Any,) * len(value) if variadic else args
        items = [_convert(item, kind, where, f"{key}[{i}]") for i, (item, kind) in enumerate(zip(value, kinds))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch("a mapping", value, key)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_dict(hint, value, where=f"{where}.{key}")
        raise _Mismatch(_describe(hint), value, key)
    if hint in (int, float) and isinstance(value, bool):
        raise _Mismatch(_describe(hint), value, key)  # bool is an int to Python, not to a config
    if hint is float and isinstance(value, int):
        return float(value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch(_describe(hint), value, key)
    return value  # a hint this checker does not read (a Protocol, a forward reference): the dataclass decides


def _mismatch_message(where: str, err: _Mismatch) -> str:
    value = err.value
    text = f"{where}: {err.key} must be {err.expected}, got {value!r} ({type(value).__name__})"
    if isinstance(value, str) and "number" in err.expected:
        try:
            float(value)
        except ValueError:
            pass
        else:  # YAML 1.1 reads 1e-3 (no dot) as a string
            text += "; YAML reads a number like 1e-3 as a string, write 1.0e-3"
    return text + "."


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and value types.

    Unknown keys raise with a close-match suggestion; each value must fit its field's type hint (str, int,
    float (an int is accepted), bool (an int is not), ``X | None``, ``Literal[...]``, ``tuple[X, ...]``,
    nested dataclasses). Lists become tuples where the field is a tuple, mappings become nested dataclasses.
    Errors are ``ConfigError``s naming ``where`` (a file, or the class), the key, the expected type and the value.
    """
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}. Known keys: {', '.join(fields)}.")
    hints_by_name = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        try:
            kwargs[key] = _convert(value, hints_by_name.get(key, Any), where, key)
        except _Mismatch as err:
            raise ConfigError(_mismatch_message(where, err)) from None
    required = [name for name, f in fields.items() if f.init and name not in data
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(map(repr, required))}.")
    return cls(**kwargs)


def load_yaml_config(cls: type[T], path: str | Path) -> T:
    """Read a YAML file into dataclass ``cls``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"No config file at {path}.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    return from_dict(cls, {} if data is None else data, where=str(path))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)
