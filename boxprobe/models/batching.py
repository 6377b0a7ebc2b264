"""Batch sizes that back off on out-of-memory.

The idea of ``accelerate.utils.find_executable_batch_size`` (catch the out-of-memory error, free the
cache, halve the batch, try again), applied per batch rather than to a whole function, so work
already done is kept: :meth:`BatchSizer.run_range` runs rows ``[0, n)`` in pieces of at most the current
size, and on out-of-memory halves the size and reruns only the piece that failed. The size it settles
on sticks for the later batches of the same loop and is recorded in ``settled`` (and logged), so a run's
results can say what batch size produced them. :func:`find_batch_size` is the whole-function form, for
loops that cannot be split from outside.
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from boxprobe.errors import BoxprobeError

logger = logging.getLogger(__name__)
T = TypeVar("T")
_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate")


class OutOfMemoryAtBatchOne(BoxprobeError, RuntimeError):
    """Even one row does not fit: the model needs more devices, a lower dtype, or offloading."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocator's out-of-memory error (CUDA, MPS, CPU)."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(t in str(err).lower() for t in _OOM_TEXT)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BatchSizer:
    """A batch size that halves on out-of-memory and remembers where it settled."""

    def __init__(self, start: int, label: str = "batch"):
        if start < 1:
            raise ValueError(f"batch size must be >= 1, got {start}")
        self.start, self.size, self.label = int(start), int(start), label
        self.halvings = 0

    @property
    def settled(self) -> int:
        """The size in use now: the start, or what out-of-memory errors brought it down to."""
        return self.size

    def _halve(self, err: BaseException, rows: int) -> None:
        if rows <= 1:
            raise OutOfMemoryAtBatchOne(
                f"{self.label}: out of memory with a batch of one ({err}); spread the model over more "
                "devices (device_map / n_devices), use bfloat16, or offload blocks to cpu") from err
        free_memory()
        self.size = max(1, min(self.size, rows) // 2)
        self.halvings += 1
        logger.warning("%s: out of memory at %d rows; retrying with batch size %d", self.label, rows, self.size)

    def run_range(self, n: int, fn: Callable[[int, int], T],
                  join: Callable[[list[tuple[int, int, T]]], T] | None = None) -> T:
        """``fn(lo, hi)`` over ``[0, n)`` in pieces of at most the current size, halving on out-of-memory.

        With one piece its result is returned as is; otherwise ``join([(lo, hi, result), ...])`` (default:
        the pieces' lists concatenated)."""
        parts: list[tuple[int, int, T]] = []
        lo = 0
        while lo < n:
            hi = min(n, lo + self.size)
            try:
                parts.append((lo, hi, fn(lo, hi)))
            except Exception as err:  # noqa: BLE001 - only out-of-memory is retried; the rest re-raises
                if not is_out_of_memory(err):
                    raise
                self._halve(err, hi - lo)
                continue
            lo = hi
        if len(parts) == 1:
            return parts[0][2]
        if join is None:
            return [x for _, _, r in parts for x in r]  # type: ignore[return-value]
        return join(parts)

    def run_chunks(self, chunks: Sequence[Sequence[Any]], fn: Callable[[list], list]) -> list:
        """``fn`` over a batch given as chunks (e.g. queries grouped by context) returning one result per
        item; on out-of-memory the batch is re-cut into pieces of at most the current size, splitting
        a chunk where it must."""
        flat = [(c, x) for c, chunk in enumerate(chunks) for x in chunk]

        def piece(lo: int, hi: int) -> list:
            regrouped: list[list] = []
            for i in range(lo, hi):
                if i == lo or flat[i][0] != flat[i - 1][0]:
                    regrouped.append([])
                regrouped[-1].append(flat[i][1])
            return fn(regrouped)

        if len(flat) <= self.size:
            try:
                return fn([list(c) for c in chunks])
            except Exception as err:  # noqa: BLE001
                if not is_out_of_memory(err):
                    raise
                self._halve(err, len(flat))
        return self.run_range(len(flat), piece)


def join_rows_by_item(items: np.ndarray) -> Callable[[list[tuple[int, int, dict]]], dict]:
    """A ``join`` for results that are dicts of row tensors, one row per entry of ``items`` (the item
    index of each row, in the caller's row order): each piece covers the rows of items ``[lo, hi)``."""

    def join(parts: list[tuple[int, int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for lo, hi, result in parts:
            rows = torch.from_numpy(np.flatnonzero((items >= lo) & (items < hi)))
            for key, value in result.items():
                if key not in out:
                    out[key] = value.new_empty((len(items), *value.shape[1:]))
                out[key][rows] = value
        return out

    return join


def find_batch_size(fn: Callable[[int], T], start: int, label: str = "batch") -> tuple[T, int]:
    """``fn(batch_size)`` from ``start``, halving on out-of-memory; returns its result and the size used."""
    sizer = BatchSizer(start, label)
    while True:
        try:
            return fn(sizer.size), sizer.size
        except Exception as err:  # noqa: BLE001
            if not is_out_of_memory(err):
                raise
            sizer._halve(err, sizer.size)


def halve_on_oom(param: str, label: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: call the function with keyword ``param`` (a batch size; its default if not passed),
    and on out-of-memory call it again with half of it. The size it settled on is logged and kept in
    the wrapper's ``last_batch_size``."""
    import functools
    import inspect

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        default = inspect.signature(fn).parameters[param].default

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = kwargs.pop(param, default)
            result, size = find_batch_size(lambda b: fn(*args, **kwargs, **{param: b}), start,
                                           label or fn.__name__)
            wrapper.last_batch_size = size
            if size != start:
                logger.warning("%s settled on %s=%d", label or fn.__name__, param, size)
            return result

        wrapper.last_batch_size = None
        return wrapper

    return wrap
