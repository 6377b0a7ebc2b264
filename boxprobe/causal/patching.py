"""The patching engine and activation patching on prompt pairs.

Path patching lives in :mod:`boxprobe.causal.path`, circuit discovery in :mod:`boxprobe.causal.circuit`,
faithfulness, completeness and minimality in :mod:`boxprobe.causal.faithfulness`, cross-model patching
in :mod:`boxprobe.causal.cmap`.

The generic loop, its setters and its exact shortcuts live in :mod:`boxprobe.causal.engine` (re-exported
here): one loop (:func:`generic_patch`) runs every study.

Direction: ``"denoising"`` runs the corrupt prompts with clean activations patched in, ``"noising"``
the clean prompts with corrupt activations. :func:`normalised_logit_diff` is 0 at the corrupt run and 1
at the clean run either way. Hooks are added only through ``model.hooks(...)`` /
``run_with_cache(names_filter=...)``, so none outlives an exception.

Results are tidy: one row per site with the metric's mean over pairs and an interval clustered by
context (:mod:`boxprobe.causal.stats`), or with ``per_pair=True`` one row per site x pair. Positions are
two columns: ``position_role`` (a role name, "all", or "" for a bare index) and ``position_index`` (the
padded index, -1 when it is a role or "all"); heads are ``head_index``.

A study in a few lines (``examples`` from ``task.read_examples``, models from ``models.load_model``)::

    pairs, stats = build_pairs(base, prepare(base, examples))          # random-query pairs (Prakash)
    batch = collate_pairs(pairs, base.tokenizer.pad_token_id, base.cfg.device)
    patch_resid_pre(base, batch).to_csv("patching_resid.csv", index=False)
    patch_heads(base, batch, positions="answer_prefix").to_csv("patching_heads.csv", index=False)
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from boxprobe.config import check_choice
from boxprobe.models.loading import result_model
from boxprobe.causal.engine import (  # noqa: F401  (re-exported: the studies import the engine from here)
    Patch, _evaluate, _hook_layer, _row_starts, _run, _site_pairs, _start, add_path_setter,
    copy_patch, copy_setter, differences, generic_patch, plan_chunks, position_ids, read_last_hooks, skip_blocks,
    split_qkv_input)
from boxprobe.causal.stats import long_per_pair, summarise
from boxprobe.data.pairs import (  # noqa: F401  (re-exported, so one import serves a whole study)
    Metric, PairBatch, answer_accuracy, attach_baselines, build_pairs, collate_pairs, logit_diff,
    normalised_logit_diff, prob_change, with_baselines)


logger = logging.getLogger(__name__)

Direction = Literal["denoising", "noising"]
Heads = Iterable[tuple[int, int]]
Positions = str | int | Sequence[str | int] | None
DEFAULT_KEY_POSITIONS = ("query_last", "query_box", "box_mention")


# -- activation patching ----------------------------------------------------------------------------


def _columns(where) -> list[int | None]:
    """Each position site's column in activations kept at chosen positions only, or None per site when
    some site covers all positions (then every position is kept)."""
    if not where or any(pos is None for _, pos in where):
        return [None] * len(where or ())
    return list(range(len(where)))


def _prepare(model, batch: PairBatch, names: Sequence[str], direction: Direction, where=None):
    """The batch with baselines, the target prompts, and source/target activations of ``names`` with their
    ``differences``. With position sites ``where`` (:func:`_position_sites`) that each patch one position
    per row, only those positions are kept ([batch, site, ...], site ``j`` at column ``_columns(where)[j]``):
    memory then grows with the patched layers and positions, not with the prompt."""
    check_choice("direction", direction, ("denoising", "noising"))
    batch = batch.to(model.cfg.device)
    pos = None
    if where and _columns(where)[0] is not None:
        pos = torch.stack([p for _, p in where], 1)
    with torch.inference_mode():
        clean_logits, clean = _run(model, batch.clean_tokens, batch.attention_mask, names, pos)
        corrupt_logits, corrupt = _run(model, batch.corrupt_tokens, batch.attention_mask, names, pos)
        batch = attach_baselines(batch, clean_logits, corrupt_logits)
        source, target = (clean, corrupt) if direction == "denoising" else (corrupt, clean)
        differs = {n: differences(source[n], target[n]) for n in names}
    return batch, ("corrupt" if direction == "denoising" else "clean"), source, target, differs


def _prepare_at(model, batch: PairBatch, names: Sequence[str], direction: Direction, positions: Positions):
    """:func:`_prepare` keeping only the patched positions; also the position sites as (label, pos, column)."""
    where = _position_sites(batch.to(model.cfg.device), positions)
    batch, target, source, _, differs = _prepare(model, batch, names, direction, where)
    return batch, target, source, differs, [(label, pos, c) for (label, pos), c in zip(where, _columns(where))]


def _position_sites(batch: PairBatch, positions: Positions) -> list[tuple[object, torch.Tensor | None]]:
    if positions is None or positions == "all":
        return [("all", None)]
    if positions == "each":
        return [(p, batch.positions(p)) for p in range(batch.n_pos)]
    specs = [positions] if isinstance(positions, (str, int)) else list(positions)
    return [(s, None) if s == "all" else (s, batch.positions(s)) for s in specs]


def _token_label(tokenizer, batch: PairBatch, pos: torch.Tensor | None) -> str:
    """The clean token at ``pos`` ("clean/corrupt" where they differ); "*" where pairs disagree."""
    if pos is None:
        return "*"
    rows = torch.arange(len(batch), device=pos.device)
    clean, corrupt = set(batch.clean_tokens[rows, pos].tolist()), set(batch.corrupt_tokens[rows, pos].tolist())
    if len(clean) > 1 or len(corrupt) > 1:
        return "*"
    words = [tokenizer.decode(list(t)) for t in (clean, corrupt)]
    return words[0] if clean == corrupt else "/".join(words)


def _heads(spec: Heads) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for layer, head in spec:
        out[int(layer)].append(int(head))
    return {layer: sorted(set(hs)) for layer, hs in sorted(out.items())}


def _z(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def metric_name(metric: Metric) -> str:
    """The name a metric's rows carry (``prob_change``, ``logit_diff``, ...)."""
    return getattr(metric, "__name__", None) or type(metric).__name__


def position_columns(label) -> tuple[str, int]:
    """(position_role, position_index) of a position site label: a role, "all", or an int index."""
    if isinstance(label, (int, np.integer)):
        return "", int(label)
    return str(label), -1


def _frame(model, keys: list[tuple], columns: list[str], values: torch.Tensor, batch: PairBatch,
           metric: Metric | str = "value", per_pair: bool = False, n_boot: int = 1000) -> pd.DataFrame:
    """Tidy result of a sweep: ``values`` [site, pair] summarised with clustered intervals, or long per pair."""
    rows = []
    for key in keys:
        row = dict(zip(columns, key))
        if "position" in row:
            row["position_role"], row["position_index"] = position_columns(row.pop("position"))
        rows.append(row)
    key_frame = pd.DataFrame(rows)
    key_frame.insert(0, "model", result_model(model))
    name = metric if isinstance(metric, str) else metric_name(metric)
    if per_pair:
        return long_per_pair(key_frame, values.numpy(), batch.contexts, metric=name)
    return summarise(key_frame, values.numpy(), batch.contexts, metric=name, n_boot=n_boot)


def patch_resid_pre(model, batch: PairBatch, *, metric: Metric = normalised_logit_diff,
                    direction: Direction = "denoising", layers: Sequence[int] | None = None, positions: Positions = "each",
                    per_pair: bool = False, **loop) -> pd.DataFrame:
    """Patch ``blocks.{l}.hook_resid_pre`` by layer x position: columns model, layer, position_role,
    position_index, token, metric, value, ci_low, ci_high, n_pairs, n_contexts (module docstring).

    ``positions``: "each" (every padded index), "all", a role (see ``PairBatch.positions``), an int, or a
    list of these. ``loop`` goes to :func:`generic_patch` (max_batch, kv_prefix, shortcuts, progress)."""
    return _layer_sweep(model, batch, "hook_resid_pre", metric, direction, layers, positions, per_pair, loop)


def patch_layer_outputs(model, batch: PairBatch, component: Literal["attn_out", "mlp_out"] = "attn_out", *,
                        metric: Metric = normalised_logit_diff, direction: Direction = "denoising",
                        layers: Sequence[int] | None = None, positions: Positions = "all", per_pair: bool = False,
                        **loop) -> pd.DataFrame:
    """Patch each layer's attention or MLP output (``hook_attn_out`` / ``hook_mlp_out``) at all or given
    positions: columns as :func:`patch_resid_pre`."""
    check_choice("component", component, ("attn_out", "mlp_out"))
    return _layer_sweep(model, batch, f"hook_{component}", metric, direction, layers, positions, per_pair, loop)


def _layer_sweep(model, batch, hook, metric, direction, layers, positions, per_pair, loop) -> pd.DataFrame:
    layers = list(range(model.cfg.n_layers) if layers is None else layers)
    names = [f"blocks.{layer}.{hook}" for layer in layers]
    batch, target, source, differs, at = _prepare_at(model, batch, names, direction, positions)
    sites = [[copy_patch(name, source[name], differs[name], pos, column=c)] for name in names for _, pos, c in at]
    values = generic_patch(model, batch, sites, {"value": metric}, target=target, **loop)[:, 0]
    tokens = [_token_label(model.tokenizer, batch, pos) for _, pos, _ in at]
    keys = [(layer, label, token) for layer in layers for (label, _, _), token in zip(at, tokens)]
    return _frame(model, keys, ["layer", "position", "token"], values, batch, metric, per_pair)


def patch_heads(model, batch: PairBatch, *, metric: Metric = normalised_logit_diff, direction: Direction = "denoising",
                positions: Positions = "all", per_pair: bool = False, **loop) -> pd.DataFrame:
    """Patch each query head's output (``attn.hook_z``, one slot per query head also under grouped-query
    attention): columns model, layer, position_role, position_index, head_index, metric, value and the
    interval columns."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [_z(layer) for layer in range(n_layers)]
    batch, target, source, differs, at = _prepare_at(model, batch, names, direction, positions)
    keys = [(layer, label, head) for layer in range(n_layers) for label, _, _ in at for head in range(n_heads)]
    sites = [[copy_patch(_z(layer), source[_z(layer)], differs[_z(layer)], pos, [head], c)]
             for layer in range(n_layers) for _, pos, c in at for head in range(n_heads)]
    values = generic_patch(model, batch, sites, {"value": metric}, target=target, **loop)[:, 0]
    return _frame(model, keys, ["layer", "position", "head_index"], values, batch, metric, per_pair)


def _group_patches(source, differs, heads: Mapping[int, list[int]], pos, column: int | None = None) -> list[Patch]:
    return [copy_patch(_z(layer), source[_z(layer)], differs[_z(layer)], pos, hs, column)
            for layer, hs in heads.items()]


def patch_head_groups(model, batch: PairBatch, groups: Mapping[str, Heads], *, metric: Metric = normalised_logit_diff,
                      direction: Direction = "denoising", positions: Positions = "all", per_pair: bool = False,
                      **loop) -> pd.DataFrame:
    """Patch each group of (layer, head) together: columns model, group, position_role, position_index,
    metric, value and the interval columns."""
    groups = {name: _heads(hs) for name, hs in groups.items()}
    names = sorted({_z(layer) for hs in groups.values() for layer in hs})
    batch, target, source, differs, at = _prepare_at(model, batch, names, direction, positions)
    sites = [_group_patches(source, differs, hs, pos, c) for hs in groups.values() for _, pos, c in at]
    values = generic_patch(model, batch, sites, {"value": metric}, target=target, **loop)[:, 0]
    return _frame(model, [(name, label) for name in groups for label, _, _ in at], ["group", "position"], values,
                  batch, metric, per_pair)


