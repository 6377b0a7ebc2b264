"""Probe targets, baselines and metrics against hand-worked examples."""

import numpy as np
import pandas as pd

from boxprobe.probing.baselines import (cluster_bootstrap, initial_prediction, majority_prediction, metric_parts,
                                        permuted_labels, score_rows)
from boxprobe.probing.targets import empty_target, incremental_target, mention_target, object_target, prior_target

VOCAB = ["apple", "bell", "cup", "drum"]


def _meta(rows):
    base = {"sample_id": 0, "numops": 1, "query_index": 0, "token_index": 5, "op_index": None, "box": 0, "k": 0,
            "mentioned": ["apple", "bell", "cup"], "initial": ["apple"], "prior_1": None}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_empty_and_object_targets_by_hand():
    meta = _meta([{"gold": ["bell", "cup"], "object": "bell", "k": 0, "sample_id": 0},
                  {"gold": ["bell", "cup"], "object": "cup", "k": 1, "sample_id": 0},
                  {"gold": [], "object": None, "k": 0, "sample_id": 1, "initial": []},
                  {"gold": ["apple"], "object": "apple", "k": 0, "sample_id": 2, "numops": 0}])
    empty = empty_target(meta)
    assert empty.y.tolist() == [0, 0, 1, 0] and empty.initial.tolist() == [0, 0, 1, 0]
    first = object_target(meta[meta.object.notna()].reset_index(drop=True), VOCAB, "first")
    assert first.y.tolist() == [1, 0]  # bell, apple
    assert first.mask[0].tolist() == [True, True, True, False]  # candidates: mentioned objects only
    assert first.initial.tolist() == [0, 0]  # the first sentence's first object of the box
    kth = object_target(meta[meta.object.notna()].reset_index(drop=True), VOCAB, "kth")
    assert kth.y.tolist() == [2] and kth.mask[0].tolist() == [True, False, True, False]  # bell already emitted
    assert kth.initial.tolist() == [-1]  # the box held one object at first: no second-object guess
    # Majority among each item's candidates; the heuristic falls back to it where it has no guess.
    assert majority_prediction(first, kth).tolist() == [0]
    assert initial_prediction(first, kth).tolist() == [0]


def test_prior_target_counts_only_changed_boxes():
    meta = _meta([{"gold": ["bell"], "prior_1": ["apple"], "k": 0},
                  {"gold": ["bell"], "prior_1": ["bell"], "k": 0},  # unchanged: trained on, not scored
                  {"gold": ["cup"], "prior_1": None, "k": 0},  # no operation on the box: dropped
                  {"gold": ["bell", "cup"], "prior_1": ["apple"], "k": 1}])  # not the first " the": dropped
    t = prior_target(meta, VOCAB, 1)
    assert t.rows.tolist() == [0, 1] and t.scored.tolist() == [True, False]
    assert t.y[0].tolist() == [True, False, False, False] and t.mask[0].tolist() == [True, True, True, False]


def test_mention_target_by_hand():
    # "Box 0 contains the apple, Box 1 contains nothing. Put the bell into Box 1. Remove the apple from Box 0."
    # queried about Box 1: the drum is never mentioned; the apple is mentioned, though no box holds it any more.
    state = {"initial_state": [["apple"], []], "mentioned": ["apple", "bell"], "numops": 1}
    meta = _meta([{**state, "gold": ["bell"], "object": "bell", "k": 0, "box": 1},
                  {**state, "gold": ["bell", "cup"], "object": "cup", "k": 1, "box": 1},  # not the first " the"
                  {"gold": ["cup"], "object": "cup", "k": 0, "sample_id": 1, "initial_state": [["cup"], ["drum"]],
                   "mentioned": ["cup", "drum"]}])
    t = mention_target(meta, VOCAB)
    assert t.rows.tolist() == [0, 2] and t.groups.tolist() == [0, 1]
    assert t.y.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert t.mask.all()  # every object's cell counts, mentioned or not (Tang: accuracy over all objects)
    # The first sentence names the apple only: the bell, brought in by an operation, is what the heuristic misses.
    assert t.initial.tolist() == [[True, False, False, False], [False, False, True, True]]
    assert majority_prediction(t, t).tolist() == [[False] * 4] * 2  # no object is mentioned in most items
    rows = score_rows(initial_prediction(t, t), t, np.arange(2), n_layers=1, n_boot=20, seed=0, kind="initial_state")
    acc = rows[(rows.metric == "accuracy") & (rows.subset == "all")].value.iloc[0]
    assert acc == 7 / 8  # one cell of eight wrong: the bell
    assert rows[rows.subset == "differs_from_initial"].n.iloc[0] == 1


def test_incremental_counts_objects_mentioned_so_far():
    context = ("Box 0 contains the apple, Box 1 contains nothing. Put the bell into Box 1. "
               "Move the apple from Box 0 to Box 1. Put the drum into Box 0.")
    meta = _meta([{"query_index": 0, "op_index": 0, "box": 1, "mention": "put"},
                  {"query_index": 0, "op_index": 1, "box": 1, "mention": "move_dest"},
                  {"query_index": 1, "op_index": 1, "box": 1, "mention": "move_dest"}])  # same context again
    t = incremental_target(meta, [context, context], VOCAB)
    assert t.rows.tolist() == [0, 1]
    assert t.y.tolist() == [[False, True, False, False], [True, True, False, False]]
    assert t.mask.tolist() == [[True, True, False, False], [True, True, False, False]]  # the drum comes later
    assert t.types == [1, 1]


def test_metrics_intervals_and_permutation():
    meta = _meta([{"gold": ["bell"] if i % 3 else [], "sample_id": i // 2, "initial": []} for i in range(40)])
    t = empty_target(meta)
    pred = np.stack([t.y, 1 - t.y], 1)  # layer 0 perfect, layer 1 always wrong
    parts = metric_parts(pred, t)
    value, low, high = cluster_bootstrap(parts["accuracy"], t.groups, 200, 0)
    assert value.tolist() == [1.0, 0.0] and (low >= 0).all() and (high <= 1).all()
    value, _, _ = cluster_bootstrap(parts["balanced_accuracy"], t.groups, 50, 0)
    assert value.tolist() == [1.0, 0.0]
    rows = score_rows(pred, t, np.arange(40), n_layers=2, n_boot=50, seed=0, kind="task")
    assert set(rows.subset) == {"all", "numops>=1", "differs_from_initial"}
    # The heuristic says "empty" everywhere, so it is wrong exactly on the non-empty boxes.
    assert rows[(rows.subset == "differs_from_initial")].n.iloc[0] == int((t.y == 0).sum())
    shuffled = permuted_labels(t, 0)
    assert sorted(shuffled) == sorted(t.y) and (shuffled != t.y).any()
