"""The errors boxprobe raises for bad input or state.

Every one derives from :class:`BoxprobeError`, so a caller (the CLI among them) can tell "the input
or the state is wrong, and the message says how" from a bug. Each also keeps the built-in base that
callers caught before (``ValueError``, ``KeyError``, ``FileNotFoundError``), so existing ``except``
clauses still work. Errors about one subsystem live next to it (``ModelLoadError`` in
``boxprobe.models.loading``, ``CacheMismatchError`` in ``boxprobe.activations.cache``...); the
general ones live here. This module imports nothing heavy: the CLI imports it at start-up.
"""

from __future__ import annotations


class BoxprobeError(Exception):
    """Every error the library raises for bad input or state; the CLI prints its message as one line."""


class ConfigError(BoxprobeError, ValueError):
    """A config file, dict or option value that does not fit what it configures."""


class DataError(BoxprobeError, ValueError):
    """A data file or table (JSONL, CSV, JSON) that is malformed or lacks what an analysis needs."""


class ArgumentError(BoxprobeError, ValueError):
    """An argument a function cannot use: an array of the wrong shape, an index out of range, an empty input."""


class MissingKeyError(BoxprobeError, KeyError):
    """A name (a column, hook, role or object) that a table or cache does not hold."""

    # KeyError's str() quotes its argument, which reads badly as a sentence.
    __str__ = BaseException.__str__


class MissingFileError(BoxprobeError, FileNotFoundError):
    """A file or directory the library needs is not there; the message says how to make it."""
