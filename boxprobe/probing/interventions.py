"""Causal check of a probe: project its directions out of the residual stream and watch the answer.

INLP-style ablation (Ravfogel et al. 2020): at ``blocks.{layer}.hook_{resid_post|resid_pre}`` the
activation ``x`` at the chosen token role (default ``query_last``; ``role=None``: every position) is
replaced by ``x @ P`` with ``P = I - span projection of the directions``
(:func:`boxprobe.probe_metrics.nullspace_projection`). The gold continuation is teacher-forced in one
pass (as in :mod:`boxprobe.behaviour.evaluate`'s fast path) and we read (a) the probability of the probed object's
first token at its position in the answer and (b) whether every *other* gold token is still the argmax,
so a probe whose directions the model uses should lower (a) while leaving (b) mostly intact.

:func:`probe_causal_check` compares no intervention, the probe's directions and random direction sets
of the same count and per-row norms (several seeds): removing k random directions from a d_model-wide
stream is the control a probe direction has to beat.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from boxprobe.behaviour.decoding import pad_rows
from boxprobe.data.queries import ALL_ROLES, QuerySet
from boxprobe.errors import ArgumentError, ConfigError, DataError
from boxprobe.models.loading import model_label
from boxprobe.probing.metrics import inlp_directions, nullspace_projection, random_directions_like

logger = logging.getLogger(__name__)
Directions = Float[torch.Tensor, "k d_model"] | Float[np.ndarray, "k d_model"]
CONDITIONS = ("none", "probe", "random")


@dataclass
class _Prepared:
    """One query, tokenized: prompt ids, gold ids, the object's index in the gold, ablated prompt positions."""

    prompt: list[int]
    gold: list[int]
    obj_index: int
    positions: list[int] | None  # indices into prompt + gold; None: every position is ablated


def _hook_name(model, layer: int, hook: str) -> str:
    n_layers = int(model.cfg.n_layers)
    if not -n_layers <= layer < n_layers:
        raise ArgumentError(f"layer {layer} is out of range for model {model_label(model)} with {n_layers} layers.")
    name = f"blocks.{layer % n_layers}.hook_{hook.removeprefix('hook_')}"
    if hook.removeprefix("hook_") not in ("resid_post", "resid_pre", "resid_mid") or name not in model.hook_dict:
        raise ConfigError(f"hook {hook!r} is not a residual-stream hook of model {model_label(model)}; "
                         "use 'resid_post' or 'resid_pre'.")
    return name


def _prepare(model, queries: QuerySet, objects: Sequence[str], role: str | None) -> list[_Prepared]:
    if not isinstance(queries, QuerySet):
        raise ConfigError("Interventions take a query set: queries = boxprobe.prepare(model, examples, spec).")
    queries.check_model(model)
    if len(objects) != len(queries):
        raise ConfigError(f"objects has {len(objects)} entries but there are {len(queries)} queries; give one "
                          "object (in that query's gold answer) per query.")
    if role is not None and role not in ALL_ROLES:
        raise ConfigError(f"Unknown role {role!r}; roles are {', '.join(ALL_ROLES)}, or None for every position.")
    out = []
    for i, (it, obj) in enumerate(zip(queries.items, objects)):
        hit = queries.role("answer_object", object=obj)
        hit = hit[hit["item"] == i]
        if not len(hit):
            raise ConfigError(f"query {i}: object {obj!r} is not in its gold answer {it.query.continuation!r}; pass "
                              "an object of the queried box (the probe's target) for every query.")
        positions = None
        if role is not None:
            rows = queries.role(role)
            positions = rows.loc[rows["item"] == i, "token_index"].tolist()
            if not positions:
                raise ConfigError(f"query {i}: no token with role {role!r}.")
        out.append(_Prepared(it.prompt, it.gold, int(hit["token_index"].iloc[0]) - len(it.prompt), positions))
    return out


def _project(act: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(act.dtype, torch.float32)  # project in at least float32 (bfloat16 models)
    return (act.to(dtype) @ P.to(act.device, dtype)).to(act.dtype)


def _ablation_hook(act, hook, *, P: torch.Tensor, rows: torch.Tensor | None, pos: torch.Tensor | None):
    """``P`` [d, d] (one set for every query) or [batch, d, d] (one projection per query of the batch), moved
    to the hooked tensor's device (blocks may sit on several)."""
    P = P.to(act.device)
    rows = None if rows is None else rows.to(act.device)
    pos = None if pos is None else pos.to(act.device)
    if P.ndim == 3:
        dtype = torch.promote_types(act.dtype, torch.float32)
        if rows is None:
            return torch.einsum("bsd,bde->bse", act.to(dtype), P.to(dtype)).to(act.dtype)
        act[rows, pos] = torch.einsum("nd,nde->ne", act[rows, pos].to(dtype), P[rows].to(dtype)).to(act.dtype)
        return act
    if rows is None:
        return _project(act, P)
    act[rows, pos] = _project(act[rows, pos], P)
    return act


def _measure(model, prepared: list[_Prepared], P: torch.Tensor | list[torch.Tensor] | None, hook_name: str,
             batch_size: int) -> pd.DataFrame:
    """One row per query; ``P=None`` runs without any hook (the baseline); a list: one projection per query."""
    tok, device = model.tokenizer, model.cfg.device
    pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0) if i is not None)
    rows_out = []
    with torch.inference_mode():
        for start in range(0, len(prepared), batch_size):
            batch = prepared[start:start + batch_size]
            ids, mask = pad_rows([b.prompt + b.gold[:-1] for b in batch], pad_id, "left", device)
            width = ids.shape[1]
            offsets = [width - len(b.prompt) - len(b.gold) + 1 for b in batch]
            if P is None:
                logits = model(ids, attention_mask=mask)
            else:
                r = p = None
                if batch[0].positions is not None:
                    r = torch.tensor([i for i, b in enumerate(batch) for _ in b.positions], device=device)
                    p = torch.tensor([o + t for b, o in zip(batch, offsets) for t in b.positions], device=device)
                Pb = torch.stack(P[start:start + len(batch)]) if isinstance(P, list) else P
                fn = partial(_ablation_hook, P=Pb, rows=r, pos=p)
                logits = model.run_with_hooks(ids, fwd_hooks=[(hook_name, fn)], attention_mask=mask)
            for i, (b, o) in enumerate(zip(batch, offsets)):
                at = o + len(b.prompt) - 1  # the position predicting gold[0]
                lp = torch.log_softmax(logits[i, at:at + len(b.gold)].float(), -1)
                hit = lp.argmax(-1).cpu() == torch.tensor(b.gold)
                logp = lp[b.obj_index, b.gold[b.obj_index]].item()
                rest = torch.cat([hit[:b.obj_index], hit[b.obj_index + 1:]])
                rows_out.append({"p_object": math.exp(logp), "logp_object": logp, "rest_unchanged": bool(rest.all()),
                                 "answer_exact": bool(hit.all()), "object_index": b.obj_index})
    return pd.DataFrame(rows_out)


def _as_projection(model, directions) -> tuple[torch.Tensor, np.ndarray]:
    """(P on the model's device, the directions as a float64 [k, d_model] array)."""
    D = torch.as_tensor(directions.detach().cpu() if isinstance(directions, torch.Tensor) else np.asarray(directions),
                        dtype=torch.float64)
    D = D.reshape(-1, D.shape[-1]) if D.ndim else D
    d_model = int(model.cfg.d_model)
    if D.ndim != 2 or D.shape[1] != d_model:
        raise ArgumentError(f"directions must be shaped [k, d_model={d_model}] for model {model_label(model)}, "
                         f"got {tuple(D.shape)}.")
    return nullspace_projection(D).to(model.cfg.device), D.numpy()


def _is_per_query(directions) -> bool:
    return isinstance(directions, (list, tuple))


def _projections(model, directions, n_queries: int) -> tuple[torch.Tensor | list[torch.Tensor], list[np.ndarray]]:
    """A shared set, or a list with one [k_i, d_model] set per query: (projection(s), the sets as arrays)."""
    if not _is_per_query(directions):
        P, D = _as_projection(model, directions)
        return P, [D]
    if len(directions) != n_queries:
        raise ArgumentError(f"{len(directions)} per-query direction sets for {n_queries} queries; give one "
                            "[k, d_model] set per query (or one shared set).")
    pairs = [_as_projection(model, d) for d in directions]
    return [p.float() for p, _ in pairs], [d for _, d in pairs]


def ablate_directions(model, queries: QuerySet, directions: Directions, *, layer: int,
                      hook: str = "resid_post", role: str | None = "query_last", objects: Sequence[str],
                      batch_size: int = 16) -> pd.DataFrame:
    """Teacher-forced answers with ``span(directions)`` projected out at ``layer``/``hook``/``role``.

    ``objects[i]`` is the object of query i whose (first-token) probability is read; it must be in that
    query's gold answer. ``directions``: one [k, d_model] set for every query, or a list of one set per query
    (e.g. the probe's decision subspace among that query's candidates). ``role=None`` ablates every position (answer tokens included). An edit at one
    prompt position reaches the answer tokens only through attention in later layers, so at the last
    layer a ``query_last`` ablation can change only the first answer token. Returns one row
    per query: query, object, p_object, logp_object, rest_unchanged (every other gold token still the
    argmax), answer_exact (every gold token the argmax), object_index (the object's token in the answer).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    name = _hook_name(model, layer, hook)
    P, _ = _projections(model, directions, len(queries))
    df = _measure(model, _prepare(model, queries, objects, role), P, name, batch_size)
    df.insert(0, "query", range(len(df)))
    df.insert(1, "object", list(objects))
    return df


def probe_causal_check(model, queries: QuerySet, objects: Sequence[str], directions: Directions, *,
                       layer: int, n_random: int = 3, seed: int = 0, hook: str = "resid_post",
                       role: str | None = "query_last", batch_size: int = 16) -> pd.DataFrame:
    """Tidy comparison of no intervention, the probe's ``directions`` and ``n_random`` random direction sets.

    Random sets (seeds ``seed .. seed + n_random - 1``) have the probe's shape and per-row norms
    (:func:`random_directions_like`); with per-query ``directions`` (a list), each query gets its own random
    set of its own count and norms. Columns: condition ("none", "probe", "random"), seed (NA except for
    random), query, object, p_object, logp_object, rest_unchanged, answer_exact, object_index, layer, hook,
    k (directions removed), norm (Frobenius norm of the set removed; 0 for "none").
    """
    name = _hook_name(model, layer, hook)
    prepared = _prepare(model, queries, objects, role)
    P, D = _projections(model, directions, len(queries))
    per_query = _is_per_query(directions)
    runs = [("none", None, None, [d[:0] for d in D]), ("probe", None, P, D)]
    for s in range(seed, seed + n_random):
        # Per query: its own draw (seeded by the seed and the query), with that query's count and row norms.
        R = [random_directions_like(d, seed=s * 1_000_003 + i) for i, d in enumerate(D)]
        runs.append(("random", s, _projections(model, R if per_query else R[0], len(queries))[0], R))
    frames = []
    for condition, s, proj, used in runs:
        df = _measure(model, prepared, proj, name, batch_size)
        df.insert(0, "query", range(len(df)))
        df.insert(1, "object", list(objects))
        used = used if per_query else used * len(df)
        frames.append(df.assign(condition=condition, seed=s, layer=layer, hook=hook, k=[len(u) for u in used],
                                norm=[float(np.linalg.norm(u)) for u in used]))
    out = pd.concat(frames, ignore_index=True)
    out["seed"] = out["seed"].astype("Int64")
    front = ["condition", "seed", "query"]
    return out[front + [c for c in out.columns if c not in front]]


EFFECTS = (("probe - none", "probe", "none"), ("random - none", "random", "none"),
           ("probe - random", "probe", "random"))
METRICS = ("p_object", "rest_unchanged", "answer_exact")


def causal_effects(df: pd.DataFrame, groups: Sequence | None = None, n_boot: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> pd.DataFrame:
    """Tidy means and paired differences of a :func:`probe_causal_check` frame, with cluster-bootstrap intervals.

    Random seeds are averaged per query first (they are draws of one control, not more items). ``groups``
    (one label per query, e.g. sample_id; default: each query its own cluster) are resampled with all their
    queries, the same draws for every condition, so differences are paired. Intervals are bootstrap
    percentiles: a mean of probabilities or rates stays within [0, 1]; a difference of two such means within
    [-1, 1] (no normal approximation). Rows: condition (none, probe, random, or "probe - none", "random - none",
    "probe - random"), metric (p_object, rest_unchanged, answer_exact), value, ci_low, ci_high, n (queries),
    n_clusters, n_seeds.
    """
    per = {c: df[df["condition"] == c].groupby("query")[list(METRICS)].mean().astype(float)
           for c in CONDITIONS if c in set(df["condition"])}
    queries = next(iter(per.values())).index
    if groups is None:
        groups = np.asarray(queries)
    groups = np.asarray(groups)
    if len(groups) != len(queries):
        raise ArgumentError(f"groups has {len(groups)} labels for {len(queries)} queries; give one per query.")
    codes, uniques = pd.factorize(pd.Series(groups))
    draws = np.random.default_rng(seed).multinomial(len(uniques), np.full(len(uniques), 1 / len(uniques)), n_boot)
    counts = np.bincount(codes, minlength=len(uniques)).astype(float)
    n_seeds = int(df.loc[df["condition"] == "random", "seed"].nunique()) if "random" in per else 0
    tail = 100 * (1 - confidence) / 2

    def summarise(values: np.ndarray) -> tuple[float, float, float]:
        sums = np.bincount(codes, weights=values, minlength=len(uniques))
        boot = (draws @ sums) / np.maximum(draws @ counts, 1e-12)
        low, high = np.percentile(boot, [tail, 100 - tail])
        value = float(values.mean())
        return value, min(float(low), value), max(float(high), value)

    rows = []
    base = {"n": len(queries), "n_clusters": len(uniques)}
    for condition, frame in per.items():
        for metric in METRICS:
            v, lo, hi = summarise(frame.loc[queries, metric].to_numpy())
            rows.append({"condition": condition, "metric": metric, "value": v, "ci_low": lo, "ci_high": hi, **base,
                         "n_seeds": n_seeds if condition == "random" else 1})
    for name, a, b in EFFECTS:
        if a in per and b in per:
            for metric in METRICS:
                diff = per[a].loc[queries, metric].to_numpy() - per[b].loc[queries, metric].to_numpy()
                v, lo, hi = summarise(diff)
                rows.append({"condition": name, "metric": metric, "value": v, "ci_low": lo, "ci_high": hi, **base,
                             "n_seeds": n_seeds if "random" in (a, b) else 1})
    return pd.DataFrame(rows)


def summarize_causal_check(df: pd.DataFrame, groups: Sequence | None = None, n_boot: int = 1000,
                           seed: int = 0) -> pd.DataFrame:
    """Per condition: mean p_object with a cluster-bootstrap percentile interval within [0, 1] (random seeds
    averaged per query first; ``groups`` as in :func:`causal_effects`), and the rest_unchanged and answer_exact
    rates."""
    effects = causal_effects(df, groups, n_boot=n_boot, seed=seed)
    rows = []
    for condition in [c for c in CONDITIONS if c in set(df["condition"])]:
        sub = df[df["condition"] == condition]
        e = effects[(effects.condition == condition)].set_index("metric")
        rows.append({"condition": condition, "n_queries": int(e.loc["p_object", "n"]),
                     "n_seeds": int(sub["seed"].nunique()) or 1, "p_object": e.loc["p_object", "value"],
                     "ci_low": e.loc["p_object", "ci_low"], "ci_high": e.loc["p_object", "ci_high"],
                     "logp_object": float(sub["logp_object"].mean()),
                     "rest_unchanged": e.loc["rest_unchanged", "value"],
                     "answer_exact": e.loc["answer_exact", "value"]})
    return pd.DataFrame(rows)


def object_directions_from_cache(reader, obj: str, layer: int, hook: str = "resid_post", n_directions: int = 1,
                                 C: float = 1.0, role: str = "query_last", items: Sequence[int] | None = None,
                                 mentioned_only: bool = True) -> Float[np.ndarray, "n_directions d_model"]:
    """INLP directions for "is ``obj`` in the queried box" at one cached layer (unit-norm rows).

    ``items`` restricts fitting to those cache rows (e.g. a training split, so the ablated queries are held
    out); ``mentioned_only`` keeps only rows whose context mentions ``obj`` (elsewhere the answer is trivially no).
    """
    name = f"blocks.{layer}.hook_{hook.removeprefix('hook_')}"
    X = reader.activations(name, role)[:, 0].double().numpy()
    meta = reader.metadata(role)
    keep = np.ones(len(meta), bool) if items is None else np.isin(np.arange(len(meta)), np.asarray(items))
    if mentioned_only:
        keep &= meta["mentioned"].map(lambda m: obj in m).to_numpy()
    y = meta["gold"].map(lambda g: obj in g).to_numpy()[keep]
    if len(np.unique(y)) < 2:
        raise DataError(f"Cache {reader.directory}: object {obj!r} is {'always' if y.any() else 'never'} in the "
                         f"queried box among the {int(keep.sum())} rows used; pick another object or more data.")
    return inlp_directions(X[keep], y, n_directions, C=C)
