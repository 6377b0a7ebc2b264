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
    return (act.to(dtype) @ P.to(dtype)).to(act.dtype)


def _ablation_hook(act, hook, *, P: torch.Tensor, rows: torch.Tensor | None, pos: torch.Tensor | None):
    if rows is None:
        return _project(act, P)
    act[rows, pos] = _project(act[rows, pos], P)
    return act


def _measure(model, prepared: list[_Prepared], P: torch.Tensor | None, hook_name: str,
             batch_size: int) -> pd.DataFrame:
    """One row per query; ``P=None`` runs without any hook (the baseline)."""
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
                fn = partial(_ablation_hook, P=P, rows=r, pos=p)
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


def ablate_directions(model, queries: QuerySet, directions: Directions, *, layer: int,
                      hook: str = "resid_post", role: str | None = "query_last", objects: Sequence[str],
                      batch_size: int = 16) -> pd.DataFrame:
    """Teacher-forced answers with ``span(directions)`` projected out at ``layer``/``hook``/``role``.

    ``objects[i]`` is the object of query i whose (first-token) probability is read; it must be in that
    query's gold answer. ``role=None`` ablates every position (answer tokens included). An edit at one
    prompt position reaches the answer tokens only through attention in later layers, so at the last
    layer a ``query_last`` ablation can change only the first answer token. Returns one row
    per query: query, object, p_object, logp_object, rest_unchanged (every other gold token still the
    argmax), answer_exact (every gold token the argmax), object_index (the object's token in the answer).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    name = _hook_name(model, layer, hook)
    P, _ = _as_projection(model, directions)
    df = _measure(model, _prepare(model, queries, objects, role), P, name, batch_size)
    df.insert(0, "query", range(len(df)))
    df.insert(1, "object", list(objects))
    return df


def probe_causal_check(model, queries: QuerySet, objects: Sequence[str], directions: Directions, *,
                       layer: int, n_random: int = 3, seed: int = 0, hook: str = "resid_post",
                       role: str | None = "query_last", batch_size: int = 16) -> pd.DataFrame:
    """Tidy comparison of no intervention, the probe's ``directions`` and ``n_random`` random direction sets.

    Random sets (seeds ``seed .. seed + n_random - 1``) have the probe's shape and per-row norms
    (:func:`random_directions_like`). Columns: condition ("none", "probe", "random"), seed (NA except for
    random), query, object, p_object, logp_object, rest_unchanged, answer_exact, object_index, layer, hook,
    k (directions removed), norm (Frobenius norm of the set removed; 0 for "none").
    """
    name = _hook_name(model, layer, hook)
    prepared = _prepare(model, queries, objects, role)
    P, D = _as_projection(model, directions)
    runs = [("none", None, None, D[:0]), ("probe", None, P, D)]
    for s in range(seed, seed + n_random):
        R = random_directions_like(D, seed=s)
        runs.append(("random", s, _as_projection(model, R)[0], R))
    frames = []
    for condition, s, proj, used in runs:
        df = _measure(model, prepared, proj, name, batch_size)
        df.insert(0, "query", range(len(df)))
        df.insert(1, "object", list(objects))
        frames.append(df.assign(condition=condition, seed=s, layer=layer, hook=hook, k=len(used),
                                norm=float(np.linalg.norm(used))))
    out = pd.concat(frames, ignore_index=True)
    out["seed"] = out["seed"].astype("Int64")
    front = ["condition", "seed", "query"]
    return out[front + [c for c in out.columns if c not in front]]


def summarize_causal_check(df: pd.DataFrame, z: float = 1.96) -> pd.DataFrame:
    """Per condition: mean p_object with a normal interval over queries (random seeds averaged per query
    first, so seeds do not pass for independent items), and the rest_unchanged and answer_exact rates."""
    rows = []
    for condition in [c for c in CONDITIONS if c in set(df["condition"])]:
        sub = df[df["condition"] == condition]
        per_query = sub.groupby("query")["p_object"].mean()
        n, mean = len(per_query), float(per_query.mean())
        half = z * float(per_query.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
        rows.append({"condition": condition, "n_queries": n, "n_seeds": int(sub["seed"].nunique()) or 1,
                     "p_object": mean, "ci_low": mean - half, "ci_high": mean + half,
                     "logp_object": float(sub["logp_object"].mean()),
                     "rest_unchanged": float(sub["rest_unchanged"].mean()),
                     "answer_exact": float(sub["answer_exact"].mean())})
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
