"""Intervals for per-pair patching values, clustered by context.

Pairs that share a context (the boxes of one state after the same operations) are not independent, so
the bootstrap resamples contexts, not pairs; percentile intervals of a mean of values in [0, 1] (an
accuracy) stay within [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def clustered_bootstrap(values: np.ndarray, clusters: Sequence, *, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and percentile interval of each row of ``values`` ([rows, pairs]), resampling ``clusters``.

    Returns (mean, low, high), one entry per row. One bootstrap weight matrix serves every row."""
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[None]
    codes, uniq = pd.factorize(pd.Series(list(clusters)))
    mean = values.mean(1)
    if len(uniq) < 2:
        return mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    counts = np.zeros((n_boot, len(uniq)))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1)
    weights = counts[:, codes]  # [boot, pairs]: each pair weighted by its context's draw count
    boots = (weights @ values.T) / weights.sum(1, keepdims=True)  # [boot, rows]
    alpha = (1 - level) / 2
    return mean, np.quantile(boots, alpha, axis=0), np.quantile(boots, 1 - alpha, axis=0)


def summarise(keys: pd.DataFrame, per_pair: np.ndarray, contexts: Sequence, *, metric: str = "value",
              n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """``keys`` (one row per site) with value (mean over pairs), ci_low, ci_high, n_pairs and n_contexts."""
    mean, lo, hi = clustered_bootstrap(per_pair, contexts, n_boot=n_boot, seed=seed)
    return keys.reset_index(drop=True).assign(metric=metric, value=mean, ci_low=lo, ci_high=hi,
                                              n_pairs=per_pair.shape[1], n_contexts=len(set(contexts)))


def long_per_pair(keys: pd.DataFrame, per_pair: np.ndarray, contexts: Sequence, *, metric: str = "value") -> pd.DataFrame:
    """One row per site x pair: ``keys`` columns, metric, pair, context, value."""
    n_sites, n_pairs = per_pair.shape
    frame = keys.loc[keys.index.repeat(n_pairs)].reset_index(drop=True)
    return frame.assign(metric=metric, pair=np.tile(np.arange(n_pairs), n_sites),
                        context=np.tile(np.asarray(list(contexts), dtype=object), n_sites), value=per_pair.reshape(-1))
