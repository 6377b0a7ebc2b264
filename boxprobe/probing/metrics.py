"""Probe targets, splits, controls, metrics and causal-check helpers for the boxes task.

Everything here takes arrays, plain python data or a metadata DataFrame, never a model.

Probe targets:

1. queried-box contents ("local"): multi-label over the object vocabulary (:func:`contents_labels`,
   :func:`mentioned_mask`, scored by :func:`contents_metrics`);
2. global state: for each object mentioned in the context, which box holds it (``n_boxes + 1`` classes,
   the last = in no box), items = (query, object) pairs (:func:`object_box_labels`);
3. incremental state and 4. prior state: other label arrays through the same multi-label probe.

Controls (Hewitt & Liang 2019): a control task gives every *type* a random but consistent label, so a probe
can only solve it by memorising types, not by reading the state; selectivity = task - control accuracy.
:func:`control_labels` is that recipe for a probe shared across types. boxprobe's contents and global-state
probes are one probe per object, so for them the recipe degenerates: permuting object identities only
renames the probes (selectivity 0 by construction), and a label fixed per object alone is learnt by each
probe's intercept. What the probe at "Box k contains" can read lexically is the queried box, so
:func:`control_contents_labels` draws a random but consistent in/out label per (queried-box type, object),
with each object's base rate, and :func:`control_state_labels` a class per (queried-box type, object) from
the object's class distribution: solvable by memorising box identity, with no tracking of moves. Where the
queried box is linearly decodable (the bundled models: ~100%), these controls are near ceiling, so negative
selectivity there says the task is harder than memorising the box, not that the probe memorises.

Majority baselines: :func:`majority_baseline` per label or per cell; :func:`majority_state_baseline` per
object block (its most frequent class), which is what the argmax-scored global-state probe competes with.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int, Shaped

from boxprobe.probing.probes import Array, LayerwiseLogisticProbe, to_numpy
from boxprobe.errors import ArgumentError, ConfigError, DataError, MissingKeyError


def _indicator(sets: Sequence[Iterable[str]], vocabulary: Sequence[str], what: str) -> np.ndarray:
    index = {obj: j for j, obj in enumerate(vocabulary)}
    out = np.zeros((len(sets), len(index)), dtype=bool)
    for i, objects in enumerate(sets):
        for obj in objects:
            if obj not in index:
                raise MissingKeyError(
                    f"{what} item {i}: object {obj!r} is not in the vocabulary of {len(index)} objects; pass the "
                    "vocabulary the data was generated with (boxprobe.task.load_vocabulary)."
                )
            out[i, index[obj]] = True
    return out


def contents_labels(
    contents: Sequence[Iterable[str]], vocabulary: Sequence[str]
) -> Bool[np.ndarray, "n_items n_objects"]:
    """Y[i, v] = object ``vocabulary[v]`` is in item i's queried box."""
    return _indicator(contents, vocabulary, "contents")


def mentioned_mask(
    mentioned: Sequence[Iterable[str]], vocabulary: Sequence[str]
) -> Bool[np.ndarray, "n_items n_objects"]:
    """M[i, v] = object ``vocabulary[v]`` is mentioned in item i's context (the "non-trivial" cells)."""
    return _indicator(mentioned, vocabulary, "mentioned")


def object_box_labels(states: Sequence[Sequence[Sequence[str]]], mentioned: Sequence[Iterable[str]]) -> pd.DataFrame:
    """Global-state items: one row per (item, mentioned object) with the box holding it.

    ``states[i]`` lists box contents (box 0 first); ``label`` is the box index, or ``n_boxes`` (the last class)
    when the object is in no box. Objects within an item are sorted, so rows are deterministic.
    """
    rows = []
    for i, (state, objects) in enumerate(zip(states, mentioned, strict=True)):
        where = {obj: box for box, contents in enumerate(state) for obj in contents}
        rows += [{"item": i, "object": obj, "label": where.get(obj, len(state))} for obj in sorted(objects)]
    return pd.DataFrame(rows, columns=["item", "object", "label"])


def contents_metrics(
    pred: Bool[Array, "n_items n_layers n_objects"],
    Y: Bool[Array, "n_items n_objects"],
    mentioned: Bool[Array, "n_items n_objects"],
    numops: Int[Array, "n_items"],
) -> pd.DataFrame:
    """Tidy (layer, metric, numops, value, n_items) table of contents-probe accuracy.

    ``exact_set``: the whole predicted set equals the true set; ``full``: accuracy over all (item, object)
    cells; ``non_trivial``: accuracy over mentioned cells only. ``numops`` is ``"all"`` or an int.
    """
    pred = to_numpy(pred).astype(bool)
    Y, M, numops = to_numpy(Y).astype(bool), to_numpy(mentioned).astype(bool), to_numpy(numops)
    if pred.ndim != 3 or pred.shape[0] != Y.shape[0] or pred.shape[2] != Y.shape[1] or M.shape != Y.shape:
        raise ArgumentError(f"Shapes disagree: pred {pred.shape}, Y {Y.shape}, mentioned {M.shape} "
                         "(expected [n, L, V], [n, V], [n, V]).")
    correct = pred == Y[:, None, :]  # [n, L, V]
    per_item = {
        "exact_set": correct.all(2).astype(float),
        "full": correct.mean(2),
        "non_trivial": (correct & M[:, None, :]).sum(2).astype(float),
    }
    rows = []
    groups = [("all", np.ones(len(Y), bool))] + [(int(k), numops == k) for k in np.unique(numops)]
    for key, sel in groups:
        n_mentioned = M[sel].sum()
        for metric, values in per_item.items():
            total = values[sel].sum(0)
            value = total / max(n_mentioned, 1) if metric == "non_trivial" else total / max(sel.sum(), 1)
            if metric == "non_trivial" and n_mentioned == 0:
                value = np.full_like(value, np.nan)
            rows += [{"layer": layer, "metric": metric, "numops": key, "value": float(v), "n_items": int(sel.sum())}
                     for layer, v in enumerate(value)]
    return pd.DataFrame(rows)


def split_by_group(
    groups: Shaped[Array, "n_items"], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> tuple[Int[np.ndarray, "n_train"], Int[np.ndarray, "n_val"], Int[np.ndarray, "n_test"]]:
    """(train, val, test) item indices with every group (sample_id) in exactly one split."""
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1):
        raise ConfigError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}.")
    codes, uniques = pd.factorize(pd.Series(to_numpy(groups)), sort=True)
    n_groups = len(uniques)
    sizes = np.round(fractions * n_groups).astype(int)
    sizes[0] = n_groups - sizes[1:].sum()
    if ((fractions > 0) & (sizes < 1)).any():
        raise DataError(f"{n_groups} groups cannot fill splits with fractions {tuple(fractions)}; add samples.")
    order = np.random.default_rng(seed).permutation(n_groups)
    split_of_group = np.empty(n_groups, dtype=int)
    split_of_group[order] = np.repeat([0, 1, 2], sizes)
    split = split_of_group[codes]
    return tuple(np.flatnonzero(split == k) for k in range(3))


def control_labels(object_types: Sequence[Hashable], labels: Shaped[Array, "n_items"], seed: int = 0) -> np.ndarray:
    """Hewitt & Liang control task: each type gets one label drawn from the empirical label distribution.

    ``object_types[i]`` is item i's type (e.g. the object name of a (query, object) pair; tuples work);
    returns the control label of every item. The same seed and type set give the same mapping.
    """
    labels = to_numpy(labels)
    codes, _ = pd.factorize(pd.Series(list(object_types), dtype=object), sort=True)
    if len(codes) != len(labels):
        raise ArgumentError(f"object_types has {len(codes)} items but labels has {len(labels)}.")
    values, counts = np.unique(labels, return_counts=True)
    per_type = np.random.default_rng(seed).choice(values, size=codes.max() + 1, p=counts / counts.sum())
    return per_type[codes]


def control_contents_labels(
    query_types: Sequence[Hashable],
    Y: Bool[Array, "n_items n_objects"],
    mask: Bool[Array, "n_items n_objects"] | None = None,
    seed: int = 0,
) -> Bool[np.ndarray, "n_items n_objects"]:
    """Control for the contents probe: a random but consistent in/out label per (queried-box type, object).

    Each object's control labels are drawn with its base rate among counted (``mask``) cells; see the module
    docstring for why this, not a column permutation, is the control. Use the same ``mask`` when scoring.
    """
    Y = to_numpy(Y).astype(bool)
    M = np.ones_like(Y) if mask is None else to_numpy(mask).astype(bool)
    codes, _ = pd.factorize(pd.Series(list(query_types), dtype=object), sort=True)
    rate = (Y & M).sum(0) / np.maximum(M.sum(0), 1)  # [V]
    table = np.random.default_rng(seed).random((codes.max() + 1, Y.shape[1])) < rate  # [n_types, V]
    return table[codes]


def control_state_labels(
    query_types: Sequence[Hashable],
    Y: Bool[Array, "n_items n_cells"],
    mask: Bool[Array, "n_items n_cells"],
    n_classes: int,
    seed: int = 0,
) -> Bool[np.ndarray, "n_items n_cells"]:
    """Control for the global-state target, whose cells are one-hot blocks of ``n_classes`` per object: a random
    but consistent class per (queried-box type, object), drawn from that object's class distribution over counted
    items. One-hot blocks like ``Y``, so it is scored by argmax like the task."""
    Y, M = to_numpy(Y).astype(bool), to_numpy(mask).astype(bool)
    n = len(Y)
    blocks, counted = Y.reshape(n, -1, n_classes), M.reshape(n, -1, n_classes).any(-1)  # [n, O, K], [n, O]
    freq = (blocks & counted[..., None]).sum(0) + 1e-9  # [O, K]
    cumulative = np.cumsum(freq / freq.sum(-1, keepdims=True), -1)
    codes, _ = pd.factorize(pd.Series(list(query_types), dtype=object), sort=True)
    draws = np.random.default_rng(seed).random((codes.max() + 1, freq.shape[0], 1))  # [n_types, O, 1]
    table = np.minimum((draws > cumulative).sum(-1), n_classes - 1)  # a class per (type, object)
    return np.eye(n_classes, dtype=bool)[table[codes]].reshape(Y.shape)


def selectivity(task_acc: Float[Array, "n_layers"], control_acc: Float[Array, "n_layers"]) -> np.ndarray:
    """Task minus control accuracy per layer (Hewitt & Liang 2019)."""
    return to_numpy(task_acc).astype(float) - to_numpy(control_acc).astype(float)


def majority_baseline(y_train, y_test, mask_train=None, mask_test=None) -> float:
    """Accuracy on ``y_test`` of always predicting the most frequent training label.

    For multi-label [n, V] targets each output predicts its own majority (over ``mask_train`` cells) and the
    accuracy is over ``mask_test`` cells. Ties go to the smallest label.
    """
    y_train, y_test = to_numpy(y_train), to_numpy(y_test)
    if y_train.ndim == 1:
        values, counts = np.unique(y_train, return_counts=True)
        return float((y_test == values[counts.argmax()]).mean())
    Mtr = np.ones(y_train.shape, bool) if mask_train is None else to_numpy(mask_train).astype(bool)
    Mte = np.ones(y_test.shape, bool) if mask_test is None else to_numpy(mask_test).astype(bool)
    majority = (y_train.astype(bool) & Mtr).sum(0) > (~y_train.astype(bool) & Mtr).sum(0)
    return float(((y_test.astype(bool) == majority) & Mte).sum() / max(Mte.sum(), 1))


def majority_state_baseline(
    Y_train: Bool[Array, "n_train n_cells"], Y_test: Bool[Array, "n_test n_cells"],
    mask_train: Bool[Array, "n_train n_cells"], mask_test: Bool[Array, "n_test n_cells"], n_classes: int,
) -> float:
    """Global-state targets (one-hot blocks of ``n_classes`` per object): accuracy of predicting each object's
    most frequent training class, over the objects counted in the test items. Ties go to the smallest class."""
    def blocks(Y, M):
        Y, M = to_numpy(Y).astype(bool), to_numpy(M).astype(bool)
        return Y.reshape(len(Y), -1, n_classes), M.reshape(len(M), -1, n_classes).any(-1)

    (train, counted_train), (test, counted_test) = blocks(Y_train, mask_train), blocks(Y_test, mask_test)
    majority = (train & counted_train[..., None]).sum(0).argmax(-1)  # [O]
    right = (test.argmax(-1) == majority) & counted_test
    return float(right.sum() / max(counted_test.sum(), 1))


def bootstrap_difference(
    correct_a: Float[Array, "n_items n_layers"], correct_b: Float[Array, "n_items n_layers"],
    groups: Shaped[Array, "n_items"], n_boot: int = 1000, seed: int = 0, confidence: float = 0.95,
) -> pd.DataFrame:
    """Paired cluster bootstrap of accuracy(a) - accuracy(b) per layer, resampling groups (sample_ids).

    Both arrays score the same items (1-D arrays count as one layer). Returns (layer, diff, ci_low, ci_high)
    with percentile intervals; items of a resampled group all come along, so correlated examples of one
    sample do not shrink the interval.
    """
    a, b = (np.asarray(to_numpy(c), dtype=float) for c in (correct_a, correct_b))
    a, b = (c[:, None] if c.ndim == 1 else c for c in (a, b))
    if a.shape != b.shape:
        raise ArgumentError(f"correct_a {a.shape} and correct_b {b.shape} differ; for models of different depth "
                         "pick matching layers (e.g. by relative depth) first.")
    codes, uniques = pd.factorize(pd.Series(to_numpy(groups)))
    if len(codes) != len(a):
        raise ArgumentError(f"groups has {len(codes)} items but the correctness arrays have {len(a)}.")
    sums = np.zeros((len(uniques), a.shape[1]))
    np.add.at(sums, codes, a - b)
    counts = np.bincount(codes, minlength=len(uniques)).astype(float)
    draws = np.random.default_rng(seed).multinomial(len(uniques), np.full(len(uniques), 1 / len(uniques)), n_boot)
    boot = (draws @ sums) / (draws @ counts)[:, None]  # [n_boot, n_layers]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
    return pd.DataFrame({"layer": np.arange(a.shape[1]), "diff": (a - b).mean(0), "ci_low": low, "ci_high": high})


def nullspace_projection(directions: Float[Array, "k d_model"]) -> Float[Array, "d_model d_model"]:
    """Orthogonal projection onto the complement of span(directions) (INLP-style): ``x @ P`` removes them.

    Rank-deficient or near-parallel directions are fine (SVD with a relative tolerance). Returns the input's
    array type (torch keeps device and dtype; numpy float64 unless the input is another float type).
    """
    D = torch.as_tensor(to_numpy(directions), dtype=torch.float64)
    D = D.reshape(-1, D.shape[-1])
    _, s, Vh = torch.linalg.svd(D, full_matrices=False)
    Q = Vh[s > s.max() * max(D.shape) * torch.finfo(torch.float64).eps] if s.numel() else Vh[:0]
    P = torch.eye(D.shape[-1], dtype=torch.float64) - Q.T @ Q
    if isinstance(directions, torch.Tensor):
        return P.to(device=directions.device, dtype=directions.dtype if directions.is_floating_point() else None)
    dtype = np.asarray(directions).dtype
    return P.numpy().astype(dtype if dtype.kind == "f" else np.float64)


def random_directions_like(directions: Float[Array, "k d_model"], seed: int = 0) -> Float[Array, "k d_model"]:
    """Random Gaussian directions with the same shape and per-row norms: the control for a projection."""
    D = np.asarray(to_numpy(directions), dtype=np.float64)
    R = np.random.default_rng(seed).standard_normal(D.shape)
    R *= np.linalg.norm(D, axis=-1, keepdims=True) / np.linalg.norm(R, axis=-1, keepdims=True)
    if isinstance(directions, torch.Tensor):
        return torch.as_tensor(R, device=directions.device).to(directions.dtype)
    dtype = np.asarray(directions).dtype
    return R.astype(dtype if dtype.kind == "f" else np.float64)


def inlp_directions(
    X: Float[Array, "n_items d_model"], y: Shaped[Array, "n_items"], n_directions: int, C: float = 1.0, **probe_params
) -> Float[np.ndarray, "n_directions d_model"]:
    """Iterative nullspace projection (Ravfogel et al. 2020): fit a probe, project its directions out, repeat.

    Returns unit-norm directions; ``nullspace_projection`` of them removes what the probes could decode.
    """
    X = np.asarray(to_numpy(X), dtype=np.float64)
    P, found = np.eye(X.shape[1]), np.zeros((0, X.shape[1]))
    while len(found) < n_directions:
        probe = LayerwiseLogisticProbe(C=C, **probe_params).fit((X @ P)[:, None, :], y)
        W = probe.coef_[0] @ P  # stay inside the current nullspace
        found = np.concatenate([found, W / np.linalg.norm(W, axis=1, keepdims=True).clip(1e-12)])
        P = nullspace_projection(found)
    return found[:n_directions]
