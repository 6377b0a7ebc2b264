"""Fitting, predicting and scoring a :class:`~boxprobe.probing.targets.Target`, and its baselines.

Every baseline is scored on exactly the cells and items the probe is scored on, by the same metric:

- ``majority``: each item's most frequent training class among its candidates (binary: the majority class;
  per-object cells: each object's majority over the training cells that count);
- ``initial_state``: the first sentence's answer (the queried box's initial contents; where it has none for
  a class target, the majority prediction);
- ``permutation``: the same probe, same C, fit on training labels shuffled across training items;
- ``embedding`` and ``random_init`` are the same probe on other features (see :mod:`.experiment`).

Intervals are cluster-bootstrap percentiles (clusters: sample_ids, so all boxes and prefixes of one
initial state move together); a ratio of resampled sums stays within [0, 1].
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from boxprobe.probing.metrics import control_contents_labels, split_by_group
from boxprobe.probing.probes import LayerwiseLogisticProbe, LayerwiseMultiLabelProbe, select_C
from boxprobe.probing.targets import Target

logger = logging.getLogger(__name__)
NEG = -1e30


class FittedProbe:
    """A target's probe (all layers), C chosen per layer on a validation split of the training groups."""

    def __init__(self, target: Target, Cs, seed: int = 0, min_items: int = 8, split=(0.8, 0.2, 0.0),
                 tol: float = 1e-4, max_iter: int = 1000):
        self.target, self.Cs, self.seed, self.min_items, self.split = target, tuple(Cs), seed, min_items, split
        # sklearn's tol, not a looser one: at 1e-3 the ~100-class first_object softmax stopped short of its
        # optimum by a few points of test accuracy, by an amount that changed with the thread count.
        self.solver = {"tol": tol, "max_iter": max_iter}

    def fit(self, X: np.ndarray, t: Target, C=None, y=None) -> "FittedProbe":
        """Fit on features X (rows of ``t``); ``C`` fixed (else chosen), ``y`` replaces the labels (permutation)."""
        y = t.y if y is None else y
        fit, val, _ = split_by_group(t.groups, self.split, seed=self.seed)
        self.n_layers = X.shape[1]
        if t.kind == "class":
            self.models = [self._fit_one(LayerwiseLogisticProbe(**self.solver), X, y, fit, val, C)]
            self.C = self._last_C
        elif t.kind == "multilabel":
            est = LayerwiseMultiLabelProbe(class_weight="balanced", **self.solver)
            if C is None:
                chosen = select_C(X[fit], y[fit], X[val], y[val], self.Cs, estimator=est,
                                  mask_train=t.mask[fit], mask_val=t.mask[val])
                self.C, model = chosen.C, chosen.estimator
            else:
                self.C, model = C, est.set_params(C=C).fit(X, y, mask=t.mask)
            self.models = [model]
        else:  # one softmax per object over the items that mention it
            self.models, self.C = {}, {}
            for o in np.flatnonzero(t.mask.sum(0) >= self.min_items):
                items = np.flatnonzero(t.mask[:, o])
                if len(np.unique(y[items, o])) < 2:
                    continue
                f, v = np.intersect1d(items, fit), np.intersect1d(items, val)
                c = None if C is None else C.get(o)
                if c is None and (len(v) == 0 or len(np.unique(y[f, o])) < 2):
                    c = max(self.Cs)
                if c is not None:
                    f, v = items, items[:0]
                self.models[o] = self._fit_one(LayerwiseLogisticProbe(**self.solver), X, y[:, o], f, v, c)
                self.C[o] = self._last_C
            self.majority = _block_majority(y, t.mask, len(t.classes))
        return self

    def _fit_one(self, est, X, y, fit, val, C):
        if C is None and len(val) and len(np.unique(y[fit])) > 1:
            chosen = select_C(X[fit], y[fit], X[val], y[val], self.Cs, estimator=est)
            self._last_C = chosen.C
            return chosen.estimator
        self._last_C = max(self.Cs) if C is None else C
        items = np.concatenate([fit, val])
        return est.set_params(C=self._last_C).fit(X[items], y[items])

    def predict(self, X: np.ndarray, t: Target) -> np.ndarray:
        """Predictions [n, L] (class index) or [n, L, V] (cells, or a class per object)."""
        if t.kind == "class":
            model = self.models[0]
            logits = model.decision_function(X)
            if len(model.classes_) == 2:
                logits = np.stack([-logits, logits], -1)
            full = np.full(logits.shape[:2] + (len(t.classes),), NEG)
            full[..., model.classes_.astype(int)] = logits
            full = np.where(t.mask[:, None, :], full, NEG)  # candidate-restricted argmax
            return full.argmax(-1)
        if t.kind == "multilabel":
            return self.models[0].predict(X)
        out = np.broadcast_to(self.majority, (len(X), X.shape[1], len(self.majority))).copy()
        for o, model in self.models.items():
            out[:, :, o] = model.predict(X)
        return out


def permuted_labels(t: Target, seed: int) -> np.ndarray:
    """Training labels shuffled across training items (per object for per-object softmaxes)."""
    rng = np.random.default_rng(seed + 7919)
    if t.kind != "blocks":
        return t.y[rng.permutation(len(t.y))]
    y = t.y.copy()
    for o in range(y.shape[1]):
        items = np.flatnonzero(t.mask[:, o])
        y[items, o] = y[rng.permutation(items), o]
    return y


def control_labels_for(t: Target, seed: int) -> np.ndarray:
    """Hewitt–Liang control labels for a token-level multilabel target (random but consistent per token type)."""
    return control_contents_labels(t.types, t.y, t.mask, seed=seed)


def _block_majority(y, mask, n_classes) -> np.ndarray:
    counts = np.zeros((y.shape[1], n_classes))
    for c in range(n_classes):
        counts[:, c] = ((y == c) & mask).sum(0)
    return counts.argmax(1)


def majority_prediction(train: Target, test: Target) -> np.ndarray:
    """The majority baseline's predictions on ``test`` (one layer), in the probe's prediction form."""
    if train.kind == "class":
        freq = np.bincount(train.y, minlength=len(train.classes)).astype(float)
        freq = freq - np.arange(len(freq)) * 1e-9  # ties: the smallest class
        return np.where(test.mask, freq[None, :], -np.inf).argmax(1)
    if train.kind == "multilabel":
        majority = (train.y & train.mask).sum(0) > (~train.y & train.mask).sum(0)
        return np.broadcast_to(majority, test.y.shape).copy()
    return np.broadcast_to(_block_majority(train.y, train.mask, len(train.classes)), test.y.shape).copy()


def initial_prediction(train: Target, test: Target) -> np.ndarray:
    """The initial-state heuristic on ``test``: the first sentence's answer (majority where it has none)."""
    if test.kind == "class":
        return np.where(test.initial >= 0, test.initial, majority_prediction(train, test))
    return test.initial.copy()


# -- metrics ------------------------------------------------------------------------------------------------


def metric_parts(pred: np.ndarray, t: Target) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per metric, (numerator [n, L], denominator [n, L]) pairs; the metric is the mean over pairs of
    sum(num) / sum(den). ``pred``: [n, L] or [n, L, V] (a single prediction gets L = 1)."""
    if t.kind == "class":
        pred = pred if pred.ndim == 2 else pred[:, None]
        right = (pred == t.y[:, None]).astype(float)
        one = np.ones_like(right)
        parts = {"accuracy": [(right, one)]}
        if len(t.classes) == 2:
            pos = (t.y == 1)[:, None] * one
            parts["balanced_accuracy"] = [(right * pos, pos), (right * (1 - pos), 1 - pos)]
        return parts
    pred = pred if pred.ndim == 3 else pred[:, None]
    M = t.mask[:, None, :]
    right = (pred == t.y[:, None, :]) & M
    counted = np.broadcast_to(M, right.shape)
    parts = {"accuracy": [(right.sum(2).astype(float), counted.sum(2).astype(float))],
             "exact_set": [((right.sum(2) == counted.sum(2)).astype(float), np.ones(right.shape[:2]))]}
    if t.kind == "multilabel":
        pos = counted & t.y[:, None, :]
        neg = counted & ~t.y[:, None, :]
        parts["balanced_accuracy"] = [((right & pos).sum(2).astype(float), pos.sum(2).astype(float)),
                                      ((right & neg).sum(2).astype(float), neg.sum(2).astype(float))]
    return parts


def cluster_bootstrap(parts: list[tuple[np.ndarray, np.ndarray]], groups: np.ndarray, n_boot: int, seed: int,
                      confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Value, low and high per layer of mean_j(sum num_j / sum den_j), resampling clusters (``groups``)."""
    codes, uniques = pd.factorize(pd.Series(groups))
    draws = np.random.default_rng(seed).multinomial(len(uniques), np.full(len(uniques), 1 / len(uniques)), n_boot)
    values, boots = [], []
    for num, den in parts:
        sums = np.zeros((len(uniques), num.shape[1]))
        dens = np.zeros_like(sums)
        np.add.at(sums, codes, num)
        np.add.at(dens, codes, den)
        values.append(sums.sum(0) / np.maximum(dens.sum(0), 1e-12))
        boots.append((draws @ sums) / np.maximum(draws @ dens, 1e-12))
    value, boot = np.mean(values, 0), np.mean(boots, 0)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
    return value, np.minimum(low, value), np.maximum(high, value)


def score_rows(pred: np.ndarray, t: Target, items: np.ndarray, n_layers: int, n_boot: int, seed: int,
               **columns) -> pd.DataFrame:
    """Tidy rows (metric, layer, value, ci_low, ci_high, n, subset) of predictions on ``t``'s ``items``, for
    every subset view: all scored items, numops >= 1, and items where the initial-state heuristic is wrong."""
    frames = []
    for subset, keep in subsets(t, items).items():
        if not keep.any():
            continue
        sub_pred = pred[keep]
        sub_t = _take(t, items[keep])
        for metric, parts in metric_parts(sub_pred, sub_t).items():
            value, low, high = cluster_bootstrap(parts, sub_t.groups, n_boot, seed)
            if len(value) == 1 and n_layers > 1:  # a layer-independent baseline, drawn at every layer
                value, low, high = (np.repeat(a, n_layers) for a in (value, low, high))
            frames.append(pd.DataFrame({**columns, "metric": metric, "layer": np.arange(len(value)), "value": value,
                                        "ci_low": low, "ci_high": high, "n": int(keep.sum()), "subset": subset}))
    return pd.concat(frames, ignore_index=True)


def subsets(t: Target, items: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks over ``items``: ``all`` (scored items), ``numops>=1``, ``differs_from_initial``."""
    scored = t.scored[items]
    if t.kind == "class":
        differs = t.initial[items] != t.y[items]
    else:
        differs = ((t.initial[items] != t.y[items]) & t.mask[items]).any(1)
    return {"all": scored, "numops>=1": scored & (t.numops[items] >= 1), "differs_from_initial": scored & differs}


def _take(t: Target, idx: np.ndarray) -> Target:
    fields = {k: (v[idx] if isinstance(v, np.ndarray) else v) for k, v in vars(t).items()}
    if t.types is not None:
        fields["types"] = [t.types[i] for i in idx]
    return Target(**fields)
