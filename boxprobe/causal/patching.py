"""The patching engine and activation patching on prompt pairs.

Path patching lives in :mod:`boxprobe.causal.path`, circuit discovery in :mod:`boxprobe.causal.circuit`,
faithfulness, completeness and minimality in :mod:`boxprobe.causal.faithfulness`, cross-model patching
in :mod:`boxprobe.causal.cmap`.

One generic loop (:func:`generic_patch`) runs every study: a *site* is a list of :class:`Patch` es
(a hook name and a setter specialised with ``functools.partial``) applied together in one run. Sites are
batched: the target prompts are repeated once per site along the batch dimension, and each site's
setters write only into its block of rows, so up to ``max_batch`` rows go through one forward pass.

Two exact shortcuts make sweeps cheap. A patch that copies an activation identical to the one it
replaces changes nothing, so a site is run only from the first position where its source and target
differ (``Patch.start``); a site that differs nowhere is not run at all (its value is the unpatched
run's). And since a patch at position ``p`` cannot change anything before ``p``, the positions before a
chunk's earliest ``start`` come from the target run's key-value cache (``kv_prefix``; checked with
``evaluate.kv_cache_works`` and off when the cache is unreliable), so each forward only processes the
suffix. Logits handed to a metric may therefore cover only a suffix of the positions; the last
position is always the answer position (batches are left-padded), and metrics must only read it.

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
import re
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterable, Iterator, Literal, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from boxprobe.config import check_choice
from boxprobe.behaviour.decoding import cache_keyword_fix, kv_cache_works, row_view
from boxprobe.models.loading import model_label
from boxprobe.models.batching import halve_on_oom
from boxprobe.causal.stats import long_per_pair, summarise
from boxprobe.data.pairs import (  # noqa: F401  (re-exported, so one import serves a whole study)
    Metric, PairBatch, answer_accuracy, attach_baselines, build_pairs, collate_pairs, logit_diff,
    normalised_logit_diff, prob_change, with_baselines)


logger = logging.getLogger(__name__)

Direction = Literal["denoising", "noising"]
Heads = Iterable[tuple[int, int]]
Positions = str | int | Sequence[str | int] | None
DEFAULT_KEY_POSITIONS = ("query_last", "query_box", "box_mention")


def _run(model, tokens, mask, names: Sequence[str] = (), pos: Int[torch.Tensor, "batch k"] | None = None):
    """The last position's logits (all a metric reads) and the activations of ``names``: at every position,
    or with ``pos`` only at those ([batch, k, ...]), gathered as each hook fires so that no layer's
    all-position activation outlives its block."""
    store: dict[str, torch.Tensor] = {}

    def keep(act, hook, *, name: str):  # by the requested name: the hook's own may be an alias's target
        if pos is None:
            store[name] = act.clone()
        else:
            at = pos.to(act.device)
            store[name] = act[torch.arange(act.shape[0], device=act.device)[:, None], at].clone()
        return act

    with model.hooks(fwd_hooks=[(name, partial(keep, name=name)) for name in names]):
        logits = model(tokens, attention_mask=mask, logits_to_keep=1)
    return logits, {n: store[n] for n in names}


# -- setters ----------------------------------------------------------------------------------------


class Patch(NamedTuple):
    """One hook's edit within a site: ``setter(rows, offset)`` edits a site's rows in place, where
    ``rows`` covers positions ``offset:``; ``start`` is the first position it changes (None: none)."""

    hook: str
    setter: Callable[[torch.Tensor, int], None]
    start: int | None


def copy_setter(act: Float[torch.Tensor, "batch suffix *rest"], offset: int, *,
                source: Float[torch.Tensor, "batch pos *rest"], pos: Int[torch.Tensor, "batch"] | None = None,
                heads: Sequence[int] | None = None, column: int | None = None) -> None:
    """Copy ``source`` ([batch, pos, ...], all positions) into ``act`` at all positions or one position per
    row (``pos``, padded indices), for all heads or ``heads`` (dimension 2, e.g. of ``attn.hook_z``).
    ``column``: ``source`` holds only chosen positions ([batch, k, ...], see :func:`_run`) and this one's
    index among them. The copy moves to ``act``'s device: under a device map blocks sit on several."""
    dev = act.device
    h = slice(None) if heads is None else torch.as_tensor(list(heads), device=dev)
    if pos is None:
        act[:, :, h] = source[:, offset:].to(dev, act.dtype)[:, :, h]
        return
    pos = pos.to(dev)
    rows = torch.arange(act.shape[0], device=dev)
    keep = pos >= offset  # rows whose position lies in the cached prefix are identical there anyway
    rows, pos = rows[keep], pos[keep]
    src = pos if column is None else torch.full_like(pos, column)
    picked = source.to(dev, act.dtype)[rows, src]  # [rows, *rest]
    if heads is None:
        act[rows, pos - offset] = picked
    else:
        act[rows[:, None], (pos - offset)[:, None], h[None, :]] = picked[:, h]


def add_path_setter(act: Float[torch.Tensor, "batch suffix n_heads d_model"], offset: int, *,
                    writes: Sequence[tuple[torch.Tensor, list[int], torch.Tensor]], heads: Sequence[int],
                    pos: Int[torch.Tensor, "batch"] | None = None) -> None:
    """Add the senders' output difference to per-head inputs ``act`` ([batch, pos, head, d_model]).

    ``writes``: (z difference [batch, pos, head, d_head], sender heads, W_O [head, d_head, d_model]) per
    sender layer; the sum of ``z_diff[..., heads, :] @ W_O[heads]`` is formed here, one site at a time."""
    # each sender's product on its W_O's device, the sum on the receiver's (blocks may sit on several)
    delta = sum(torch.einsum("bphd,hdm->bpm", z[:, offset:, hs].to(w.device), w[hs]).to(act.device)
                for z, hs, w in writes)
    if pos is not None:
        at = torch.arange(offset, act.shape[1] + offset, device=act.device)[None, :] == pos.to(act.device)[:, None]
        delta = delta * at[..., None]
    h = torch.as_tensor(list(heads), device=act.device)
    act[:, :, h] += delta[:, :, None, :].to(act.dtype)


def _first(changed: torch.Tensor) -> int | None:
    """First position (dim 1) where a bool tensor is set in any row or feature."""
    hit = torch.nonzero(changed.reshape(changed.shape[0], changed.shape[1], -1).any(-1).any(0))
    return int(hit[0, 0]) if len(hit) else None


def differences(source: Float[torch.Tensor, "batch pos *rest"],
                target: Float[torch.Tensor, "batch pos *rest"]) -> Bool[torch.Tensor, "batch pos *rest"]:
    """Where two activations differ, reduced over the last (feature) dimension, which is kept as size 1."""
    return (source != target).any(-1, keepdim=True)


def _start(differs: torch.Tensor, pos: torch.Tensor | None, heads: Sequence[int] | None,
           column: int | None = None) -> int | None:
    """First position a patch over ``pos`` / ``heads`` changes, from ``differences`` ([batch, pos, ...], or
    [batch, k, ...] of chosen positions with ``column`` this one's index among them)."""
    if pos is None:
        return _first(differs if heads is None else differs[:, :, list(heads)])
    pos = pos.to(differs.device)
    src = pos if column is None else torch.full_like(pos, column)
    at = differs[torch.arange(len(pos), device=pos.device), src]  # [batch, (head,) 1]
    hit = (at if heads is None else at[:, list(heads)]).reshape(len(pos), -1).any(-1)
    return int(pos[hit].min()) if hit.any() else None


def copy_patch(hook: str, source: Float[torch.Tensor, "batch pos *rest"],
               differs: Bool[torch.Tensor, "batch pos *rest"], pos: Int[torch.Tensor, "batch"] | None = None,
               heads: Sequence[int] | None = None, column: int | None = None) -> Patch:
    """A Patch copying ``source`` into a run; ``differs = differences(source, that run's activation)``
    (``column``: both hold chosen positions only, see :func:`copy_setter`)."""
    return Patch(hook, partial(copy_setter, source=source, pos=pos, heads=heads, column=column),
                 _start(differs, pos, heads, column))


# -- the generic loop -------------------------------------------------------------------------------


@contextmanager
def split_qkv_input(model, on: bool = True) -> Iterator[None]:
    """Enable the per-head Q/K/V input copies (``attn.hook_{q,k,v}_input``), restoring the flags on exit."""
    saved = bool(getattr(model.cfg, "use_split_qkv_input", False))
    attn_in = bool(getattr(model.cfg, "use_attn_in", False))
    if not on or saved:
        yield
        return
    try:
        if attn_in:
            model.set_use_attn_in(False)
        model.set_use_split_qkv_input(True)
        yield
    finally:
        model.set_use_split_qkv_input(False)
        if attn_in:
            model.set_use_attn_in(True)


def _stacked_hook(act, hook, *, entries, n: int, offset: int):
    for block, setter in entries:
        setter(act[block * n:(block + 1) * n], offset)
    return act


def _evaluate(metrics: Mapping[str, Metric], logits, batch: PairBatch) -> torch.Tensor:
    """[metric, pair] values of ``logits``."""
    n = len(batch)
    logits = logits.to(batch.clean_tokens.device)  # the last block's device may not be the batch's
    return torch.stack([torch.as_tensor(f(logits, batch)).float().reshape(-1).expand(n).cpu() for f in metrics.values()])


def _collect_hook(act, hook, *, out: torch.Tensor, sites: list[int], n: int, offset: int, pos: torch.Tensor):
    # Record each site's activation at its rows' position ``pos``; rows before ``offset`` keep the target's.
    rows, pos = torch.arange(n, device=act.device), pos.to(act.device)
    keep = pos >= offset
    for block, site in enumerate(sites):
        out[site, rows[keep]] = act[block * n + rows[keep], pos[keep] - offset].to(out.dtype).cpu()
    return act


@halve_on_oom("max_batch", "patching")  # reruns with half the rows per forward on out-of-memory
def generic_patch(model, batch: PairBatch, sites: Sequence[Sequence[Patch]], metrics: Mapping[str, Metric], *,
                  target: Literal["clean", "corrupt"], max_batch: int = 64, kv_prefix: bool | None = None,
                  split_qkv: bool = False, shortcuts: bool = True, progress: bool = True,
                  collect: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                  skip_layers: bool | None = None) -> Float[torch.Tensor, "site metric pair"]:
    """Each metric, per pair, with each site's patches applied to the ``target`` prompts.

    ``collect``: hook name -> (pos [pair], out [site, pair, ...]); each site's activation of that hook at
    ``pos`` is written into ``out`` (prefilled by the caller with the unpatched run's values, which rows
    whose ``pos`` lies in a cached prefix keep).

    ``max_batch``: rows per forward (sites x pairs; at least one site). ``kv_prefix``: reuse the target's
    key-value cache before each chunk's first changed position (None: when ``kv_cache_works``).
    ``skip_layers``: start a site whose patches all sit at layer L or above at block L, from the target's
    residual stream (exact: nothing below L changes; None: with ``kv_prefix`` when the target's residual
    streams fit in 512 MiB; never with left padding, whose positions a later block cannot recover). ``shortcuts=False`` runs every site over every position (no skipping, no
    cache), for comparison."""
    check_choice("target", target, ("clean", "corrupt"))
    tokens, mask = (batch.clean_tokens if target == "clean" else batch.corrupt_tokens), batch.attention_mask
    n = tokens.shape[0]
    if shortcuts:
        starts = [min((p.start for p in site if p.start is not None), default=None) for site in sites]
    else:
        starts, kv_prefix, skip_layers = [0] * len(sites), False, False
        sites = [[p._replace(start=0) for p in site] for site in sites]
    # A site whose patches all sit at layer L or above leaves layers below L as in the target run.
    floor = min((_hook_layer(name) for name in (collect or {})), default=model.cfg.n_layers)
    layer_of = [min([_hook_layer(p.hook) for p in site if p.start is not None] + [floor]) for site in sites]
    live = [i for i, s in enumerate(starts) if s is not None]
    values = torch.empty(len(sites), len(metrics), n)
    per_forward = max(1, max_batch // n)
    with torch.inference_mode(), cache_keyword_fix(model), split_qkv_input(model, split_qkv):
        if kv_prefix is None:
            kv_prefix = bool(live) and max(starts[i] for i in live) > 0 and kv_cache_works(
                model, tokens[0, int(batch.pad[0]):].tolist())
        if skip_layers is None:  # the target's residual stream at every layer is kept for the whole batch
            skip_layers = kv_prefix and tokens.numel() * model.cfg.d_model * model.cfg.n_layers * 4 <= 2 ** 29
        # Starting at a later block takes positions from the cache length, not from the mask: no padding then.
        skip_layers = bool(skip_layers and kv_prefix and (mask is None or bool(mask.all())))
        if not skip_layers:
            layer_of = [0] * len(sites)
        # Chunks of one start layer and neighbouring start positions: little is recomputed in either.
        live.sort(key=lambda i: (layer_of[i], -starts[i]))
        resid: dict[int, torch.Tensor] = {}
        needed = sorted({layer_of[i] for i in live} - {0})

        lo = min((starts[i] for i in live), default=0) if kv_prefix else 0  # no chunk reads positions before

        def keep(act, hook):
            resid[_hook_layer(hook.name)] = act[:, lo:].clone()
            return act

        with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", keep) for layer in needed]):
            # metrics read only the last position: unembed that one (a 256k vocabulary makes it the largest tensor)
            if kv_prefix:
                logits, full_kv = model(tokens, attention_mask=mask, return_type="logits_and_cache", use_cache=True,
                                        logits_to_keep=1)
            else:
                logits = model(tokens, attention_mask=mask, logits_to_keep=1)
        values[:] = _evaluate(metrics, logits, batch)
        chunks = [live[i:i + per_forward] for i in range(0, len(live), per_forward)]
        for chunk in tqdm(chunks, desc="patching", unit="forward", disable=not progress):
            offset = min(starts[i] for i in chunk) if kv_prefix else 0
            first = min(layer_of[i] for i in chunk)
            entries = defaultdict(list)
            for block, i in enumerate(chunk):
                for patch in sites[i]:
                    if patch.start is not None:
                        entries[patch.hook].append((block, patch.setter))
            hooks = [(name, partial(_stacked_hook, entries=e, n=n, offset=offset)) for name, e in entries.items()]
            hooks += [(name, partial(_collect_hook, out=out, sites=chunk, n=n, offset=offset, pos=pos))
                      for name, (pos, out) in (collect or {}).items()]
            rows = torch.arange(n, device=tokens.device).repeat(len(chunk))
            full_mask = mask  # unpadded: the causal mask alone is right, and cheaper to build
            kwargs = {"attention_mask": None if full_mask is None else full_mask[rows], "logits_to_keep": 1}
            if offset:  # the target's own keys and values before the chunk's first change, never copied per row
                kwargs["past_key_values"] = row_view(full_kv, rows, offset)
            inputs = tokens[rows, offset:]
            if first:
                inputs, kwargs["start_at_layer"] = resid[first][rows.to(resid[first].device), offset - lo:], first
            with model.hooks(fwd_hooks=hooks):
                logits = model(inputs, **kwargs)
            for block, i in enumerate(chunk):
                values[i] = _evaluate(metrics, logits[block * n:(block + 1) * n], batch)
    return values


def _hook_layer(name: str) -> int:
    """The block a hook belongs to (0 for hooks before the first block)."""
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


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
    key_frame.insert(0, "model", model_label(model))
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
    where = _position_sites(batch.to(model.cfg.device), positions)
    batch, target, source, _, differs = _prepare(model, batch, names, direction, where)
    cols = _columns(where)
    sites = [[copy_patch(name, source[name], differs[name], pos, column=c)]
             for name in names for (_, pos), c in zip(where, cols)]
    values = generic_patch(model, batch, sites, {"value": metric}, target=target, **loop)[:, 0]
    tokens = [_token_label(model.tokenizer, batch, pos) for _, pos in where]
    keys = [(layer, label, token) for layer in layers for (label, _), token in zip(where, tokens)]
    return _frame(model, keys, ["layer", "position", "token"], values, batch, metric, per_pair)


def patch_heads(model, batch: PairBatch, *, metric: Metric = normalised_logit_diff, direction: Direction = "denoising",
                positions: Positions = "all", per_pair: bool = False, **loop) -> pd.DataFrame:
    """Patch each query head's output (``attn.hook_z``, one slot per query head also under grouped-query
    attention): columns model, layer, position_role, position_index, head_index, metric, value and the
    interval columns."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [_z(layer) for layer in range(n_layers)]
    where = _position_sites(batch.to(model.cfg.device), positions)
    batch, target, source, _, differs = _prepare(model, batch, names, direction, where)
    cols = _columns(where)
    keys = [(layer, label, head) for layer in range(n_layers) for label, _ in where for head in range(n_heads)]
    sites = [[copy_patch(_z(layer), source[_z(layer)], differs[_z(layer)], pos, [head], c)]
             for layer in range(n_layers) for (_, pos), c in zip(where, cols) for head in range(n_heads)]
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
    where = _position_sites(batch.to(model.cfg.device), positions)
    batch, target, source, _, differs = _prepare(model, batch, names, direction, where)
    cols = _columns(where)
    sites = [_group_patches(source, differs, hs, pos, c) for hs in groups.values() for (_, pos), c in zip(where, cols)]
    values = generic_patch(model, batch, sites, {"value": metric}, target=target, **loop)[:, 0]
    return _frame(model, [(name, label) for name in groups for label, _ in where], ["group", "position"], values,
                  batch, metric, per_pair)


