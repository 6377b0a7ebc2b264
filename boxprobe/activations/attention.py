"""Where each attention head looks from the query's final token: the queried box's labels, the gold objects.

For every layer and head, the attention *mass* from the prompt's last token (role ``query_last`` of
:mod:`boxprobe.data.positions`, the "contains" the answer follows) to a role is the sum of the attention
weights over that role's token positions; ``mean_token`` divides it by the number of positions.
The roles (``ROLES``) are:

- ``queried_box_label``: every mention of the queried box's label in the description (the token
  holding the label's last character); with ``by_mention=True`` also split into
  ``queried_box_label:initial``, ``:move_src``, ``:move_dest``, ``:remove`` and ``:put``;
- ``correct_objects``: every token (first..last) of every mention of an object in the gold answer;
- ``other_objects``: every token of the mentions of all other objects;
- ``query_box_label``: the box-label token of the statement (role ``query_box``).

The roles are disjoint, so their masses sum to at most 1. A role with no tokens in a prompt (an
empty box has no correct objects) gets mass NaN, not 0, and is left out of the averages.

Memory: a hook on each ``attn.hook_pattern`` keeps only the query token's row, ``[batch, head, key]``,
so no ``[batch, head, pos, pos]`` pattern outlives its layer; the pass stops after the last layer's
pattern (the unembedding, large for big vocabularies, never runs).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from boxprobe.report import plots
from boxprobe.behaviour.decoding import pad_rows
from boxprobe.data.positions import ROLES as POSITION_ROLES
from boxprobe.data.prompts import Query
from boxprobe.data.queries import QuerySet
from boxprobe.models.loading import model_id, model_label
from boxprobe.errors import ArgumentError, ConfigError, DataError

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("queried_box_label", "correct_objects", "other_objects", "query_box_label")
MENTIONS: tuple[str, ...] = ("initial", "move_src", "move_dest", "remove", "put")
MENTION_ROLES: tuple[str, ...] = tuple(f"queried_box_label:{m}" for m in MENTIONS)
QUERY_KEYS = ["sample_id", "num_operations", "box"]
HEAD_KEYS = ["layer", "head_index", "role"]  # not "head": it would shadow DataFrame.head


def roles_for(by_mention: bool = False) -> tuple[str, ...]:
    """The roles measured: ``ROLES``, plus the queried box's label split by mention kind if ``by_mention``."""
    return ROLES + (MENTION_ROLES if by_mention else ())


# -- positions --------------------------------------------------------------------------------


def role_positions(table: pd.DataFrame, query: Query, by_mention: bool = False,
                   column: str = "padded_index") -> dict[str, list[int]]:
    """Token positions (``column`` of a one-prompt position table) of each role of ``roles_for(by_mention)``."""
    qbox = table[table["role"] == "query_box"]
    box = int(qbox["box"].iloc[0])
    # All-boxes prompts end on the first box's statement: the gold is that box's example.
    example = next((e for e in query.examples if e.box == box), query.examples[0])
    gold = set(re.findall(r"\bthe (\w+)", example.gold))
    labels = table[table["role"] == "box_mention"]
    labels = labels[labels["box"].to_numpy(dtype=float, na_value=np.nan) == box]
    out: dict[str, list[int]] = {"queried_box_label": sorted(labels[column].astype(int)),
                                 "correct_objects": [], "other_objects": [],
                                 "query_box_label": sorted(qbox[column].astype(int))}
    firsts = table[table["role"] == "object_first"]
    lasts = table[table["role"] == "object_last"].set_index("char_start")[column]
    for row in firsts.itertuples():  # a mention spans object_first..object_last (one character span)
        span = range(int(getattr(row, column)), int(lasts[row.char_start]) + 1)
        out["correct_objects" if row.object in gold else "other_objects"].extend(span)
    if by_mention:
        for m in MENTIONS:
            out[f"queried_box_label:{m}"] = sorted(labels.loc[labels["mention"] == m, column].astype(int))
    return {role: sorted(set(pos)) for role, pos in out.items()}


def role_indicator(position_sets: Sequence[Mapping[str, Iterable[int]]], roles: Sequence[str], n_keys: int,
                   device: str | torch.device = "cpu") -> Float[torch.Tensor, "batch role key"]:
    """1 where key position ``k`` of item ``b`` belongs to ``roles[r]``, else 0."""
    ind = torch.zeros((len(position_sets), len(roles), n_keys), dtype=torch.float32)
    for b, sets in enumerate(position_sets):
        for r, role in enumerate(roles):
            pos = sorted(set(sets.get(role, ())))
            if pos and not 0 <= min(pos) <= max(pos) < n_keys:
                raise ArgumentError(f"Item {b}, role {role!r}: positions {pos} fall outside the {n_keys} key positions.")
            ind[b, r, pos] = 1.0
    return ind.to(device)


def role_masses(rows: Float[torch.Tensor, "batch layer head key"],
                indicator: Float[torch.Tensor, "batch role key"]) -> Float[torch.Tensor, "batch layer head role"]:
    """Attention mass per role: the sum of each row's weights over the role's positions (NaN if it has none)."""
    masses = torch.einsum("blhk,brk->blhr", rows.float(), indicator.float())
    empty = indicator.sum(-1) == 0
    return masses.masked_fill(empty[:, None, None, :], float("nan"))


# -- capture ------------------------------------------------------------------------------------


def query_attention_rows(model, tokens: Int[torch.Tensor, "batch pos"],
                         attention_mask: Int[torch.Tensor, "batch pos"],
                         query_pos: Int[torch.Tensor, "batch"] | Sequence[int],
                         ) -> Float[torch.Tensor, "batch layer head key"]:
    """The attention pattern row of token ``query_pos[b]`` of every item, layer and head, as float32.

    Each layer's hook slices its ``[batch, head, query, key]`` pattern to the query rows at once; the
    hooks live only inside ``run_with_hooks`` (removed even when the forward pass raises).
    """
    device = model.cfg.device
    tokens, attention_mask = tokens.to(device), attention_mask.to(device)
    batch, width = tokens.shape
    qpos = torch.as_tensor(query_pos, dtype=torch.long, device=device)
    if qpos.shape != (batch,) or bool((qpos < 0).any() or (qpos >= width).any()):
        raise ArgumentError(f"query_pos must hold one position in 0..{width - 1} per item, got {qpos.tolist()}.")
    n_layers = int(model.cfg.n_layers)
    items = torch.arange(batch, device=device)
    out: list[torch.Tensor | None] = [None] * n_layers

    def make_hook(layer: int):
        def hook(pattern: torch.Tensor, hook) -> None:
            # [batch, head, key]: the full pattern is dropped; gathered on the tokens' device (blocks may sit apart)
            dev = pattern.device
            out[layer] = pattern[items.to(dev), :, qpos.to(dev), :].float().to(items.device)
            if all(o is not None for o in out):
                raise StopAtLayerException(None)  # caught by the bridge: skip the final norm and unembedding
        return hook

    with torch.inference_mode():
        hooks = [(f"blocks.{l}.attn.hook_pattern", make_hook(l)) for l in range(n_layers)]
        model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=attention_mask, return_type=None)
    missing = [l for l, o in enumerate(out) if o is None]
    if missing:
        raise ArgumentError(f"attn.hook_pattern of layer(s) {missing} never fired in model {model_label(model)!r}; "
                           "this architecture's attention may not expose its pattern.")
    return torch.stack(out, dim=1)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AttentionConfig:
    """What :func:`attention_to_roles` measures and how it batches."""

    batch_size: int = 16
    """Prompts per forward pass (left-padded, padding masked)."""
    by_mention: bool = False
    """Also split the queried box's label mentions by kind (initial, move_src, ...)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.")


def _padded_batch(queries: QuerySet, start: int, end: int, pad_id: int, device):
    # Prompts only: every role measured here lies in the prompt, and the query row is its last token.
    items = queries.items[start:end]
    tokens, mask = pad_rows([it.prompt for it in items], pad_id, "left", device)
    table = queries.positions[(queries.positions["item"] >= start) & (queries.positions["item"] < end)]
    table = table[table["role"].isin(POSITION_ROLES)].copy()
    table["item"] -= start
    shift = tokens.shape[1] - np.array([len(it.prompt) for it in items])
    table["padded_index"] = table["token_index"].to_numpy() + shift[table["item"].to_numpy()]
    return tokens, mask, table


def attention_to_roles(model, queries: QuerySet, config: AttentionConfig = AttentionConfig()) -> pd.DataFrame:
    """Attention mass from each query's final token to each role, per query, layer and head.

    Columns: model, query (index into ``queries``), sample_id, num_operations, box (the queried box),
    numops, layer, head_index, role, mass, n_tokens (positions in the role), mean_token (mass / n_tokens).
    """
    if not isinstance(queries, QuerySet):
        raise ConfigError("attention_to_roles takes a query set: queries = boxprobe.prepare(model, examples, spec).")
    queries.check_model(model)
    if not len(queries):
        raise ConfigError("No queries to measure attention on.")
    cfg, tok = config, model.tokenizer
    roles = roles_for(cfg.by_mention)
    masses, counts, meta = [], [], []
    starts = range(0, len(queries), cfg.batch_size)
    for start in tqdm(starts, desc="attention", unit="batch", disable=not cfg.progress):
        batch = queries.queries[start:start + cfg.batch_size]
        tokens, mask, table = _padded_batch(queries, start, start + len(batch), tok.pad_token_id, model.cfg.device)
        groups = dict(tuple(table.groupby("item")))
        qpos = [int(groups[i].loc[groups[i]["role"] == "query_last", "padded_index"].iloc[0])
                for i in range(len(batch))]
        sets = [role_positions(groups[i], q, cfg.by_mention) for i, q in enumerate(batch)]
        ind = role_indicator(sets, roles, tokens.shape[1], model.cfg.device)
        masses.append(role_masses(query_attention_rows(model, tokens, mask, qpos), ind).cpu().numpy())
        counts.append(ind.sum(-1).cpu().numpy().astype(np.int32))
        for i, q in enumerate(batch):
            box = int(groups[i].loc[groups[i]["role"] == "query_box", "box"].iloc[0])
            ex = next((e for e in q.examples if e.box == box), q.examples[0])
            meta.append((start + i, ex.sample_id, ex.num_operations, box, ex.numops))
    m = np.concatenate(masses)  # [query, layer, head, role]
    n_q, n_l, n_h, n_r = m.shape
    q_idx, l_idx, h_idx, r_idx = (a.ravel() for a in np.indices(m.shape))
    info = pd.DataFrame(meta, columns=["query", *QUERY_KEYS, "numops"])
    frame = info.iloc[q_idx].reset_index(drop=True)
    frame.insert(0, "model", model_id(model))
    n_tokens = np.concatenate(counts)[q_idx, r_idx]
    frame = frame.assign(layer=l_idx.astype(np.int16), head_index=h_idx.astype(np.int16),
                         role=pd.Categorical.from_codes(r_idx, categories=list(roles)),
                         mass=m.ravel().astype(np.float32), n_tokens=n_tokens)
    frame["mean_token"] = (frame["mass"] / frame["n_tokens"].where(frame["n_tokens"] > 0)).astype(np.float32)
    return frame


# -- aggregation and comparison -------------------------------------------------------------------


def _mean_ci(df: pd.DataFrame, keys: list[str], value: str, z: float, bounds: tuple[float, float]) -> pd.DataFrame:
    """Mean of ``value`` per ``keys`` with a normal interval on the cluster-robust standard error.

    The queries of one state share its description, so they are clustered by state (sample_id,
    num_operations) when those columns are there; the interval is clipped to ``bounds`` (a mass lies
    in [0, 1], a difference of masses in [-1, 1]). NaN for a single cluster.
    """
    df = df.dropna(subset=[value])
    cluster = [c for c in ("sample_id", "num_operations") if c in df.columns]
    mean = df.groupby(keys, observed=True, sort=True)[value].transform("mean")
    resid = df.assign(_r=df[value] - mean)
    by_cluster = resid.groupby(keys + cluster, observed=True, sort=True)["_r"].sum() if cluster else resid.set_index(
        keys)["_r"]
    sq = (by_cluster ** 2).groupby(level=list(range(len(keys))), observed=True, sort=True).agg(["sum", "count"])
    stats = df.groupby(keys, observed=True, sort=True)[value].agg(["mean", "count"])
    g = sq["count"].to_numpy()
    se = np.sqrt(np.where(g > 1, g / np.maximum(g - 1, 1), np.nan) * sq["sum"].to_numpy()) / stats["count"].to_numpy()
    lo, hi = bounds
    return stats.reset_index().assign(ci_low=np.clip(stats["mean"].to_numpy() - z * se, lo, hi),
                                      ci_high=np.clip(stats["mean"].to_numpy() + z * se, lo, hi),
                                      n=stats["count"].to_numpy().astype(int)).drop(columns=["count"])


def aggregate_attention(raw: pd.DataFrame, by_numops: bool = True, value: str = "mass",
                        z: float = 1.96) -> pd.DataFrame:
    """Mean of ``value`` (``mass`` or ``mean_token``) per model, layer, head, role and numops, with an
    interval clustered by state and kept within [0, 1].

    Columns: model, layer, head_index, role, scope (``all`` for every query, ``numops`` per value),
    numops (Int64, missing for ``all``), mean, ci_low, ci_high, n (queries in which the role has tokens).
    """
    missing = [c for c in ["model", *HEAD_KEYS, "numops", value] if c not in raw.columns]
    if missing:
        raise DataError(f"aggregate_attention: missing column(s) {', '.join(missing)}; "
                         "pass the frame of attention_to_roles.")
    keys = ["model", *HEAD_KEYS]
    parts = [_mean_ci(raw, keys, value, z, (0.0, 1.0)).assign(scope="all", numops=pd.NA)]
    if by_numops:
        parts.append(_mean_ci(raw, keys + ["numops"], value, z, (0.0, 1.0)).assign(scope="numops"))
    out = pd.concat(parts, ignore_index=True)
    out["numops"] = out["numops"].astype("Int64")
    out["role"] = out["role"].astype(str)
    return out[keys + ["scope", "numops", "mean", "ci_low", "ci_high", "n"]]


def _aggregated(df: pd.DataFrame) -> pd.DataFrame:
    return aggregate_attention(df) if "mean" not in df.columns and "mass" in df.columns else df


def _numops_rows(df: pd.DataFrame, numops) -> pd.DataFrame:
    """Rows of one scope: ``numops="all"`` (every query) or one numops value."""
    if "scope" not in df.columns:
        return df
    if str(numops) == "all":
        return df[df["scope"] == "all"]
    return df[(df["scope"] == "numops") & (df["numops"] == int(numops))]


def rank_heads(df: pd.DataFrame, role: str = "queried_box_label", top_k: int = 10, numops="all") -> pd.DataFrame:
    """The ``top_k`` heads of each model by mean attention to ``role`` (raw or aggregated frame).

    Columns: model, rank (1 = most attention), layer, head_index, role, mean, ci_low, ci_high, n.
    """
    agg = _numops_rows(_aggregated(df), numops)
    agg = agg[agg["role"].astype(str) == role]
    if agg.empty:
        raise DataError(f"rank_heads: no rows for role {role!r} and numops {numops!r}; roles present: "
                         f"{sorted(df['role'].astype(str).unique())}.")
    top = (agg.sort_values(["model", "mean", "layer", "head_index"], ascending=[True, False, True, True])
           .groupby("model", sort=False).head(top_k).copy())
    top.insert(1, "rank", top.groupby("model").cumcount() + 1)
    return top[["model", "rank", *HEAD_KEYS, "mean", "ci_low", "ci_high", "n"]].reset_index(drop=True)


def compare_heads(df_a: pd.DataFrame, df_b: pd.DataFrame, role: str | None = None, numops="all",
                  z: float = 1.96) -> pd.DataFrame:
    """Head-by-head difference A − B in mean attention, with a 95% interval.

    Two raw frames (``attention_to_roles``) are compared *paired*, query by query, over the queries
    both hold (the interval of the mean paired difference). Otherwise both are aggregated and the
    interval assumes independent estimates (half-widths combined in quadrature).
    Columns: layer, head_index, role, diff, ci_low, ci_high, n, paired, model_a, model_b.
    """
    names = [str(d["model"].iloc[0]) if "model" in d.columns and len(d) else label
             for d, label in ((df_a, "A"), (df_b, "B"))]
    paired = "mass" in df_a.columns and "mass" in df_b.columns
    a, b = (d if role is None else d[d["role"].astype(str) == role] for d in (df_a, df_b))
    if paired:
        if numops != "all":
            a, b = a[a["numops"] == int(numops)], b[b["numops"] == int(numops)]
        keys = QUERY_KEYS + HEAD_KEYS
        for d, n in ((a, names[0]), (b, names[1])):
            if d.duplicated(keys).any():
                raise DataError(f"compare_heads: model {n!r} has several rows per (sample_id, num_operations, box, "
                                 "layer, head, role); pass the frame of one attention_to_roles run.")
        both = a.assign(role=a["role"].astype(str))[keys + ["mass"]].merge(
            b.assign(role=b["role"].astype(str))[keys + ["mass"]], on=keys, suffixes=("_a", "_b"))
        both["diff"] = both["mass_a"] - both["mass_b"]
        out = _mean_ci(both, HEAD_KEYS, "diff", z, (-1.0, 1.0)).rename(columns={"mean": "diff"})
    else:
        a, b = (_numops_rows(_aggregated(d), numops) for d in (a, b))
        both = a.assign(role=a["role"].astype(str)).merge(b.assign(role=b["role"].astype(str)), on=HEAD_KEYS,
                                                          suffixes=("_a", "_b"))
        half = lambda s: (both[f"ci_high_{s}"] - both[f"ci_low_{s}"]) / 2  # noqa: E731
        diff = both["mean_a"] - both["mean_b"]
        width = np.sqrt(half("a") ** 2 + half("b") ** 2)
        out = both[HEAD_KEYS].assign(diff=diff, ci_low=(diff - width).clip(-1, 1), ci_high=(diff + width).clip(-1, 1),
                                     n=np.minimum(both["n_a"], both["n_b"]))
    if out.empty:
        raise DataError(f"compare_heads: models {names[0]!r} and {names[1]!r} share no (query,) layer, head and role"
                         f"{f' for role {role!r}' if role else ''}; measure both on the same queries.")
    return out.assign(paired=paired, model_a=names[0], model_b=names[1]).reset_index(drop=True)


def attention_heads_table(agg: pd.DataFrame) -> pd.DataFrame:
    """The dashboard's ``attention_heads.csv``: model, layer, head, role, mean, ci_low, ci_high, n (all queries)."""
    agg = _numops_rows(_aggregated(agg), "all")
    return agg[["model", *HEAD_KEYS, "mean", "ci_low", "ci_high", "n"]].reset_index(drop=True)


# -- one example ----------------------------------------------------------------------------------


def example_attention_figure(model, queries: QuerySet, index: int = 0, layer: int | None = None,
                             head: int | None = None, mark_roles: bool = True) -> go.Figure:
    """Attention from the final token of query ``index`` of ``queries`` to every token of its prompt.

    Rows: one head (``layer`` and ``head``), every head of ``layer``, ``head`` in every layer, or
    (neither given) each layer's mean over heads. With ``mark_roles``, tokens of the queried box's
    labels are suffixed ``[box]`` and tokens of gold objects ``[gold]``.
    """
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    for name, value, limit in (("layer", layer, n_layers), ("head", head, n_heads)):
        if value is not None and not 0 <= value < limit:
            raise ArgumentError(f"{name}={value} is out of range: model {model_label(model)!r} has {limit} {name}s "
                             f"(0..{limit - 1}).")
    query = queries[index].query
    tokens, mask, table = _padded_batch(queries, index, index + 1, model.tokenizer.pad_token_id, model.cfg.device)
    qpos = int(table.loc[table["role"] == "query_last", "padded_index"].iloc[0])
    rows = query_attention_rows(model, tokens, mask, [qpos])[0].cpu()  # [layer, head, key]
    if layer is not None and head is not None:
        att, labels = rows[layer, head][None], [f"L{layer} H{head}"]
    elif layer is not None:
        att, labels = rows[layer], [f"L{layer} H{h}" for h in range(n_heads)]
    elif head is not None:
        att, labels = rows[:, head], [f"L{l} H{head}" for l in range(n_layers)]
    else:
        att, labels = rows.mean(1), [f"L{l} mean" for l in range(n_layers)]
    words = model.tokenizer.convert_ids_to_tokens(tokens[0].tolist())
    if mark_roles:
        sets = role_positions(table, query)
        for role, tag in (("queried_box_label", "[box]"), ("correct_objects", "[gold]")):
            for p in sets[role]:
                words[p] = f"{words[p]} {tag}"
    box = int(table.loc[table["role"] == "query_box", "box"].iloc[0])
    sid = query.examples[0].sample_id
    title = (f"Attention from the final token, {model_label(model)}: sample {sid}, box {box}"
             f" (gold: {query.examples[0].gold})")
    return plots.attention_example(words, att, title=title, row_labels=labels)
