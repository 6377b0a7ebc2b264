"""Probe features read from an activation cache a block of layers at a time, and the probes fit per block
joined back into one (used by :mod:`boxprobe.probing.experiment`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from boxprobe.activations.cache import CacheReader
from boxprobe.data.queries import QuerySet
from boxprobe.probing.baselines import FittedProbe


@dataclass
class Side:
    """One cached item set (train or test) of one model: metadata per role, the cache its features are read
    from, embedding features, contexts, queries."""

    meta: dict
    reader: CacheReader
    hook: str
    embed: dict
    contexts: list
    queries: QuerySet
    layers: tuple[int, ...]
    """The model's layer number of each cached slot."""

    def features(self, role, layers: slice) -> np.ndarray:
        """Float32 features of ``role`` (a tuple: its roles' rows in turn) at cached slots ``layers``: read
        from disk in the stored dtype, upcast for this block only."""
        return np.concatenate([self.reader.activations(self.hook, r, layers).float().numpy() for r in _roles(role)])

    def rows(self, hook: str, role) -> torch.Tensor:
        """Another cached hook of one slot (e.g. the unembedding's input) at ``role``'s rows, in the stored dtype."""
        return torch.cat([self.reader.activations(hook, r)[:, 0] for r in _roles(role)])

    def embedding(self, role) -> np.ndarray:
        """Embedding-layer features of ``role`` (a tuple: its roles' rows in turn), held in memory."""
        return np.concatenate([self.embed[r] for r in _roles(role)])


def _roles(role) -> tuple[str, ...]:
    """A target's role, or tuple of roles whose rows it reads in turn, as a tuple."""
    return role if isinstance(role, tuple) else (role,)


def joined_probe(probes: list[FittedProbe]) -> FittedProbe:
    """One FittedProbe over every layer from probes fit on consecutive blocks of layers (class targets: one
    layer-wise estimator each, whose per-layer arrays are joined)."""
    if len(probes) == 1:
        return probes[0]
    merged = copy.copy(probes[0])
    parts = [p.models[0] for p in probes]
    est = copy.copy(parts[0])
    for attr in ("coef_", "intercept_", "mean_", "n_iter_"):
        setattr(est, attr, np.concatenate([getattr(e, attr) for e in parts]))
    est.n_layers_ = sum(e.n_layers_ for e in parts)
    est.C = np.concatenate([np.broadcast_to(np.asarray(e.C, dtype=float), (e.n_layers_,)) for e in parts])
    merged.models, merged.n_layers = [est], est.n_layers_
    merged.C = np.concatenate([np.broadcast_to(np.asarray(p.C, dtype=float), (p.n_layers,)) for p in probes])
    return merged
