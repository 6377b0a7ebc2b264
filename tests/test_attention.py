"""Attention from the query's final token: hook rows, left padding, role positions and masses, aggregation."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from boxprobe.activations.attention import (
    MENTION_ROLES,
    ROLES,
    AttentionConfig,
    aggregate_attention,
    attention_heads_table,
    attention_to_roles,
    compare_heads,
    example_attention_figure,
    query_attention_rows,
    rank_heads,
    role_indicator,
    role_masses,
    role_positions,
)
from boxprobe.report.dashboard import RUN_FILES
from boxprobe.models.loading import load_model
from boxprobe.data.positions import batch_position_table
from boxprobe.data.queries import prepare, resolve_spec
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples
from helpers import make_toy_checkpoint

N_LAYERS, N_HEADS = 2, 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_toy_checkpoint(tmp_path_factory.mktemp("attn") / "ckpt", n_layers=N_LAYERS, n_heads=N_HEADS,
                               init_std=0.3)  # wide weights: attention far from uniform, so heads differ
    return load_model(path, device="cpu")


@pytest.fixture(scope="module")
def queryset(model):
    cfg = TaskConfig(num_samples=2, num_operations=3, seed=1)
    examples = [e for s in generate_sequences(cfg) for e in sequence_examples(s, cfg)]
    # Every 5th of 0..3-operation prompts: lengths differ, so a batch needs real left padding.
    return prepare(model, examples[::5], resolve_spec(model, "toy"))


@pytest.fixture(scope="module")
def queries(queryset):
    return queryset.queries


def quiet(**kw):
    return AttentionConfig(progress=False, **kw)


def encode(model, prompts):
    enc = model.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def cached_patterns(model, tokens, mask):
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    return torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(N_LAYERS)], 1)  # b l h q k


def hooks_left(model) -> int:
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())


def words_of(model, prompt):
    return model.tokenizer.convert_ids_to_tokens(model.tokenizer(prompt)["input_ids"])


def hand_positions(model, query):
    """Role positions found from the toy tokens alone (word level: one token per word)."""
    words = words_of(model, query.prompt)
    ex = query.examples[0]
    stmt = max(i for i, w in enumerate(words) if w == "Statement")
    labels = [i for i in range(1, stmt) if words[i - 1] == "Box" and words[i] == str(ex.box)]
    gold = set(re.findall(r"the (\w+)", ex.gold))
    objects = [i for i in range(1, stmt) if words[i - 1] == "the"]
    query_label = max(i for i in range(1, len(words)) if words[i - 1] == "Box")
    return {"queried_box_label": labels, "query_box_label": [query_label],
            "correct_objects": [i for i in objects if words[i] in gold],
            "other_objects": [i for i in objects if words[i] not in gold]}


# -- hook rows -----------------------------------------------------------------------------------


def test_hook_rows_equal_cached_pattern_unpadded(model, queries):
    tokens, mask = encode(model, [queries[3].prompt])
    assert bool(mask.all())
    rows = query_attention_rows(model, tokens, mask, [tokens.shape[1] - 1])
    full = cached_patterns(model, tokens, mask)
    assert rows.shape == (1, N_LAYERS, N_HEADS, tokens.shape[1])
    torch.testing.assert_close(rows, full[:, :, :, -1, :])
    torch.testing.assert_close(rows.sum(-1), torch.ones(1, N_LAYERS, N_HEADS))
    assert hooks_left(model) == 0


def test_hook_rows_under_left_padding_equal_single_prompts(model, queries):
    batch = queries[:6]
    tokens, mask = encode(model, [q.prompt for q in batch])
    assert not bool(mask.all()), "the batch should need padding"
    width = tokens.shape[1]
    rows = query_attention_rows(model, tokens, mask, [width - 1] * len(batch))
    torch.testing.assert_close(rows, cached_patterns(model, tokens, mask)[:, :, :, -1, :])
    for b, q in enumerate(batch):
        t1, m1 = encode(model, [q.prompt])
        single = query_attention_rows(model, t1, m1, [t1.shape[1] - 1])[0]
        pad = width - t1.shape[1]
        assert float(rows[b, :, :, :pad].abs().sum()) == 0.0  # padding receives no attention
        torch.testing.assert_close(rows[b, :, :, pad:], single, atol=1e-5, rtol=1e-4)
    # Any query position, not only the last: compare with the full pattern rows at those positions.
    qpos = torch.tensor([width - 1 - (b % 3) for b in range(len(batch))])
    rows = query_attention_rows(model, tokens, mask, qpos)
    full = cached_patterns(model, tokens, mask)
    torch.testing.assert_close(rows, full[torch.arange(len(batch)), :, :, qpos, :])
    with pytest.raises(ValueError, match="query_pos"):
        query_attention_rows(model, tokens, mask, [width] * len(batch))


def test_hooks_are_removed_when_the_forward_pass_raises(model, queries, queryset):
    tokens, mask = encode(model, [queries[0].prompt])

    def boom(pattern, hook):
        raise RuntimeError("boom in layer 1")

    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", boom)]):
        with pytest.raises(RuntimeError, match="boom"):
            query_attention_rows(model, tokens, mask, [tokens.shape[1] - 1])  # layer 0's hook already fired
        assert hooks_left(model) == 1  # only the caller's own hook
        with pytest.raises(RuntimeError, match="boom"):
            attention_to_roles(model, queryset[:3], quiet())
        assert hooks_left(model) == 1
    assert hooks_left(model) == 0
    rows = query_attention_rows(model, tokens, mask, [tokens.shape[1] - 1])  # still works afterwards
    torch.testing.assert_close(rows.sum(-1), torch.ones(1, N_LAYERS, N_HEADS))


# -- positions and masses ------------------------------------------------------------------------


def test_role_masses_from_hand_specified_positions():
    rows = torch.zeros(2, 1, 2, 6)
    rows[0, 0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.25, 0.15])
    rows[0, 0, 1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    rows[1, 0, 0] = torch.full((6,), 1 / 6)
    rows[1, 0, 1] = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    sets = [{"queried_box_label": [1, 4], "correct_objects": [2], "other_objects": [], "query_box_label": [5]},
            {"queried_box_label": [0], "correct_objects": [2, 3, 3], "other_objects": [1, 4], "query_box_label": [5]}]
    ind = role_indicator(sets, ROLES, 6)
    assert ind.shape == (2, 4, 6) and float(ind[1, 1].sum()) == 2  # a repeated position counts once
    m = role_masses(rows, ind)
    assert m.shape == (2, 1, 2, 4)
    torch.testing.assert_close(m[0, 0, 0, [0, 1, 3]], torch.tensor([0.45, 0.3, 0.15]))
    assert math.isnan(float(m[0, 0, 0, 2]))  # no other objects: undefined, not 0
    torch.testing.assert_close(m[0, 0, 1, [0, 1, 3]], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(m[1, 0, 0], torch.tensor([1 / 6, 2 / 6, 2 / 6, 1 / 6]))
    torch.testing.assert_close(m[1, 0, 1], torch.tensor([0.5, 0.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="outside"):
        role_indicator([{"queried_box_label": [6]}], ROLES, 6)


def test_role_positions_match_the_tokens(model, queries):
    tok = model.tokenizer
    for q in queries:
        table = batch_position_table([q], tok)
        got = role_positions(table, q, by_mention=True)
        want = hand_positions(model, q)
        for role in ROLES:
            assert got[role] == sorted(want[role]), (role, q.prompt)
        assert sorted(p for r in MENTION_ROLES for p in got[r]) == got["queried_box_label"]
        assert got["queried_box_label:initial"] == want["queried_box_label"][:1]
    assert any(hand_positions(model, q)["correct_objects"] for q in queries)
    assert any(len(hand_positions(model, q)["queried_box_label"]) > 1 for q in queries)


def test_attention_to_roles_masses_are_consistent(model, queries, queryset):
    raw = attention_to_roles(model, queryset, quiet(batch_size=4, by_mention=True))
    assert len(raw) == len(queries) * N_LAYERS * N_HEADS * (len(ROLES) + len(MENTION_ROLES))
    main = raw[raw["role"].isin(ROLES)]
    total = main.groupby(["query", "layer", "head_index"])["mass"].sum(min_count=1)
    assert float(total.max()) <= 1 + 1e-5 and float(total.min()) > 0
    split = raw[raw["role"].isin(MENTION_ROLES)].groupby(["query", "layer", "head_index"])["mass"].sum()
    np.testing.assert_allclose(split.to_numpy(), main[main["role"] == "queried_box_label"]
                               .set_index(["query", "layer", "head_index"])["mass"].loc[split.index].to_numpy(), atol=1e-6)
    empty = main["n_tokens"] == 0
    assert main.loc[empty, "mass"].isna().all() and main.loc[~empty, "mass"].notna().all()
    np.testing.assert_allclose(main["mean_token"], main["mass"] / main["n_tokens"].where(~empty), rtol=1e-5)
    first = raw[raw["query"] == 0].iloc[0]
    assert (first["sample_id"], first["box"], first["numops"]) == (
        queries[0].examples[0].sample_id, queries[0].examples[0].box, queries[0].examples[0].numops)
    one = attention_to_roles(model, queryset, quiet(batch_size=1, by_mention=True))
    np.testing.assert_allclose(one["mass"], raw["mass"], atol=1e-5)  # batching and padding change nothing


def test_known_attention_gives_known_masses(model, queries, queryset):
    """Heads whose query row is overwritten with a one-hot on a chosen token put all their mass there."""
    chosen = queryset.select([i for i, q in enumerate(queries) if q.examples[0].gold != "nothing"][:4])
    batch = chosen.queries
    tokens, _ = encode(model, [q.prompt for q in batch])
    width = tokens.shape[1]
    hand = [hand_positions(model, q) for q in batch]
    shift = [width - len(words_of(model, q.prompt)) for q in batch]
    targets = {(0, 1): "queried_box_label", (1, 2): "correct_objects", (1, 3): "query_box_label"}

    def make(layer):
        def overwrite(pattern, hook):
            pattern = pattern.clone()
            for (l, h), role in targets.items():
                if l == layer:
                    pattern[:, h, -1, :] = 0.0
                    for b in range(len(batch)):
                        pattern[b, h, -1, shift[b] + hand[b][role][0]] = 1.0
            return pattern
        return overwrite

    with model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", make(l)) for l in range(N_LAYERS)]):
        raw = attention_to_roles(model, chosen, quiet(batch_size=len(batch)))
    for (l, h), role in targets.items():
        d = raw[(raw["layer"] == l) & (raw["head_index"] == h)]
        np.testing.assert_allclose(d.loc[d["role"] == role, "mass"], 1.0, atol=1e-6)
        np.testing.assert_allclose(d.loc[d["role"] != role, "mass"].fillna(0.0), 0.0, atol=1e-6)
    free = raw[(raw["layer"] == 0) & (raw["head_index"] == 0) & (raw["role"] == "queried_box_label")]
    assert float(free["mass"].max()) < 0.99  # an untouched head is not one-hot by accident
    top = rank_heads(raw, "queried_box_label", top_k=1)
    assert (top.loc[0, "layer"], top.loc[0, "head_index"]) == (0, 1) and top.loc[0, "mean"] == pytest.approx(1.0)


# -- aggregation ----------------------------------------------------------------------------------


def synthetic_raw(model_name="m", offset=0.0):
    rows = []
    for q, (numops, masses) in enumerate([(0, [0.2, 0.4]), (0, [0.4, 0.6]), (1, [0.6, np.nan]), (1, [0.8, 0.2])]):
        for head, mass in enumerate(masses):
            rows.append({"model": model_name, "query": q, "sample_id": q, "num_operations": q, "box": 0,
                         "numops": numops, "layer": 0, "head_index": head, "role": "queried_box_label",
                         "mass": mass + offset * (head + 1), "n_tokens": 1})
    return pd.DataFrame(rows)


def test_aggregate_attention_means_intervals_and_numops():
    agg = aggregate_attention(synthetic_raw())
    assert list(agg.columns) == ["model", "layer", "head_index", "role", "scope", "numops", "mean", "ci_low", "ci_high",
                                 "n"]
    row = agg[(agg["head_index"] == 0) & (agg["scope"] == "all")].iloc[0]
    values = np.array([0.2, 0.4, 0.6, 0.8])
    half = 1.96 * values.std(ddof=1) / 2
    assert row["n"] == 4 and row["mean"] == pytest.approx(0.5)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.5 - half, 0.5 + half))
    nan_head = agg[(agg["head_index"] == 1) & (agg["numops"] == 1)].iloc[0]
    assert nan_head["n"] == 1 and nan_head["mean"] == pytest.approx(0.2) and math.isnan(nan_head["ci_low"])
    assert agg[(agg["head_index"] == 1) & (agg["scope"] == "all")]["n"].item() == 3  # the NaN is left out
    assert set(aggregate_attention(synthetic_raw(), by_numops=False)["scope"]) == {"all"}
    table = attention_heads_table(agg)
    assert set(RUN_FILES["attention_heads.csv"]) <= set(table.columns)
    assert not table.duplicated(["model", "layer", "head_index", "role"]).any() and len(table) == 2
    with pytest.raises(ValueError, match="missing column"):
        aggregate_attention(synthetic_raw().drop(columns="numops"))


def test_rank_heads_orders_by_mean_per_model():
    raw = pd.concat([synthetic_raw("a"), synthetic_raw("b").assign(head_index=lambda d: 1 - d["head_index"])])
    top = rank_heads(raw, "queried_box_label", top_k=1)
    assert list(top["model"]) == ["a", "b"] and list(top["head_index"]) == [0, 1] and list(top["rank"]) == [1, 1]
    both = rank_heads(raw, "queried_box_label", top_k=5, numops=0)
    assert list(both[both["model"] == "a"]["head_index"]) == [1, 0] and list(both["rank"]) == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="no rows for role"):
        rank_heads(raw, "correct_objects")


def test_compare_heads_paired_and_from_aggregates():
    a, b = synthetic_raw("a", offset=0.1), synthetic_raw("b")
    paired = compare_heads(a, b)
    assert paired["paired"].all() and set(paired["model_a"]) == {"a"} and set(paired["model_b"]) == {"b"}
    head0 = paired[paired["head_index"] == 0].iloc[0]
    assert head0["diff"] == pytest.approx(0.1) and head0["ci_low"] == pytest.approx(0.1)  # constant difference
    assert paired[paired["head_index"] == 1]["n"].item() == 3
    agg = compare_heads(aggregate_attention(a), aggregate_attention(b))
    assert not agg["paired"].any()
    h0 = agg[agg["head_index"] == 0].iloc[0]
    agg_a, agg_b = aggregate_attention(a), aggregate_attention(b)
    width = np.hypot(*[(d.iloc[0]["ci_high"] - d.iloc[0]["ci_low"]) / 2 for d in (agg_a, agg_b)])
    assert h0["diff"] == pytest.approx(0.1) and h0["ci_high"] - h0["diff"] == pytest.approx(width)
    assert compare_heads(a, b, numops=1)[lambda d: d["head_index"] == 1]["diff"].item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="share no"):
        compare_heads(a, b.assign(sample_id=b["sample_id"] + 100))


def test_example_attention_figure_labels_tokens(model, queries, queryset):
    index = next(i for i, q in enumerate(queries) if q.examples[0].gold != "nothing")
    q = queries[index]
    words = words_of(model, q.prompt)
    fig = example_attention_figure(model, queryset, index, layer=1)
    heat = fig.data[0]
    assert np.asarray(heat.z).shape == (N_HEADS, len(words))
    np.testing.assert_allclose(np.asarray(heat.z).sum(1), 1.0, atol=1e-5)
    labels = list(fig.layout.xaxis.ticktext)
    hand = hand_positions(model, q)
    assert all(labels[p].endswith("[box]") for p in hand["queried_box_label"])
    assert all(labels[p].endswith("[gold]") for p in hand["correct_objects"])
    assert labels[-1] == words[-1] == "contains"
    assert np.asarray(example_attention_figure(model, queryset, index).data[0].z).shape == (N_LAYERS, len(words))
    assert np.asarray(example_attention_figure(model, queryset, index, layer=0, head=2).data[0].z).shape == (1, len(words))
    with pytest.raises(ValueError, match="head=9 is out of range"):
        example_attention_figure(model, queryset, index, head=9)
