"""Activation patching, path patching, faithfulness and cross-model patching (CMAP) on prompt pairs.

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

Path patching (:func:`path_patch`) patches the DIRECT path sender -> receiver: the senders'
clean-minus-corrupt output ``(z_clean - z_corrupt) @ W_O`` is added to the receivers' own copy of the
residual stream that feeds their query, key or value (``attn.hook_{q,k,v}_input``, enabled with
``set_use_split_qkv_input``; it enters before the block's RMSNorm/LayerNorm, so the normalisation is
recomputed), while every other reader, including the receiver's other inputs, sees the target run.

A study in a few lines (``examples`` from ``task.read_examples``, models from ``models.load_model``)::

    pairs, stats = build_pairs(base, prepare(base, examples), "query-box")
    batch = collate_pairs(pairs[:32], base.tokenizer.pad_token_id, base.cfg.device)
    patch_resid_pre(base, batch).to_csv("patching_resid.csv", index=False)
    patch_heads(base, batch, positions="query_last").to_csv("patching_heads.csv", index=False)
    cross_model_patch(base, code_model, batch, {"fetchers": [(3, 2), (3, 5)]}).to_csv("cmap.csv", index=False)
"""

from __future__ import annotations

import copy
import logging
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
from boxprobe.behaviour.decoding import cache_keyword_fix, kv_cache_works
from boxprobe.models.loading import check_same_family, model_label
from boxprobe.models.batching import halve_on_oom
from boxprobe.data.pairs import (  # noqa: F401  (re-exported, so one import serves a whole study)
    Metric, PairBatch, answer_accuracy, attach_baselines, build_pairs, collate_pairs, logit_diff,
    normalised_logit_diff, with_baselines)
from boxprobe.errors import ArgumentError, ConfigError

logger = logging.getLogger(__name__)

Direction = Literal["denoising", "noising"]
Heads = Iterable[tuple[int, int]]
Positions = str | int | Sequence[str | int] | None
DEFAULT_KEY_POSITIONS = ("query_last", "query_box", "box_mention")


def _run(model, tokens, mask, names: Sequence[str] = ()):
    if not names:
        return model(tokens, attention_mask=mask), {}
    logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=list(names))
    return logits, {n: cache[n] for n in names}


# -- setters ----------------------------------------------------------------------------------------


class Patch(NamedTuple):
    """One hook's edit within a site: ``setter(rows, offset)`` edits a site's rows in place, where
    ``rows`` covers positions ``offset:``; ``start`` is the first position it changes (None: none)."""

    hook: str
    setter: Callable[[torch.Tensor, int], None]
    start: int | None


def copy_setter(act: Float[torch.Tensor, "batch suffix *rest"], offset: int, *,
                source: Float[torch.Tensor, "batch pos *rest"], pos: Int[torch.Tensor, "batch"] | None = None,
                heads: Sequence[int] | None = None) -> None:
    """Copy ``source`` ([batch, pos, ...], all positions) into ``act`` at all positions or one position per
    row (``pos``, padded indices), for all heads or ``heads`` (dimension 2, e.g. of ``attn.hook_z``)."""
    h = slice(None) if heads is None else torch.as_tensor(list(heads), device=act.device)
    if pos is None:
        act[:, :, h] = source[:, offset:, h]
        return
    rows = torch.arange(act.shape[0], device=act.device)
    keep = pos >= offset  # rows whose position lies in the cached prefix are identical there anyway
    rows, pos = rows[keep], pos[keep]
    if heads is None:
        act[rows, pos - offset] = source[rows, pos]
    else:
        act[rows[:, None], (pos - offset)[:, None], h[None, :]] = source[rows[:, None], pos[:, None], h[None, :]]


def add_path_setter(act: Float[torch.Tensor, "batch suffix n_heads d_model"], offset: int, *,
                    writes: Sequence[tuple[torch.Tensor, list[int], torch.Tensor]], heads: Sequence[int],
                    pos: Int[torch.Tensor, "batch"] | None = None) -> None:
    """Add the senders' output difference to per-head inputs ``act`` ([batch, pos, head, d_model]).

    ``writes``: (z difference [batch, pos, head, d_head], sender heads, W_O [head, d_head, d_model]) per
    sender layer; the sum of ``z_diff[..., heads, :] @ W_O[heads]`` is formed here, one site at a time."""
    delta = sum(torch.einsum("bphd,hdm->bpm", z[:, offset:, hs], w[hs]) for z, hs, w in writes)
    if pos is not None:
        at = torch.arange(offset, act.shape[1] + offset, device=act.device)[None, :] == pos[:, None]
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


def _start(differs: torch.Tensor, pos: torch.Tensor | None, heads: Sequence[int] | None) -> int | None:
    """First position a patch over ``pos`` / ``heads`` changes, from ``differences`` ([batch, pos, ...])."""
    if pos is None:
        return _first(differs if heads is None else differs[:, :, list(heads)])
    at = differs[torch.arange(len(pos), device=pos.device), pos]  # [batch, (head,) 1]
    hit = (at if heads is None else at[:, list(heads)]).reshape(len(pos), -1).any(-1)
    return int(pos[hit].min()) if hit.any() else None


def copy_patch(hook: str, source: Float[torch.Tensor, "batch pos *rest"],
               differs: Bool[torch.Tensor, "batch pos *rest"], pos: Int[torch.Tensor, "batch"] | None = None, heads: Sequence[int] | None = None) -> Patch:
    """A Patch copying ``source`` into a run; ``differs = differences(source, that run's activation)``."""
    return Patch(hook, partial(copy_setter, source=source, pos=pos, heads=heads), _start(differs, pos, heads))


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
    return torch.stack([torch.as_tensor(f(logits, batch)).float().mean().cpu() for f in metrics.values()])


@halve_on_oom("max_batch", "patching")  # reruns with half the rows per forward on out-of-memory
def generic_patch(model, batch: PairBatch, sites: Sequence[Sequence[Patch]], metrics: Mapping[str, Metric], *,
                  target: Literal["clean", "corrupt"], max_batch: int = 64, kv_prefix: bool | None = None,
                  split_qkv: bool = False, shortcuts: bool = True,
                  progress: bool = True) -> Float[torch.Tensor, "site metric"]:
    """Each metric (mean over pairs) with each site's patches applied to the ``target`` prompts.

    ``max_batch``: rows per forward (sites x pairs; at least one site). ``kv_prefix``: reuse the target's
    key-value cache before each chunk's first changed position (None: when ``kv_cache_works``).
    ``shortcuts=False`` runs every site over every position (no skipping, no cache), for comparison."""
    check_choice("target", target, ("clean", "corrupt"))
    tokens, mask = (batch.clean_tokens if target == "clean" else batch.corrupt_tokens), batch.attention_mask
    n = tokens.shape[0]
    if shortcuts:
        starts = [min((p.start for p in site if p.start is not None), default=None) for site in sites]
    else:
        starts, kv_prefix = [0] * len(sites), False
        sites = [[p._replace(start=0) for p in site] for site in sites]
    live = sorted((i for i, s in enumerate(starts) if s is not None), key=lambda i: -starts[i])
    values = torch.empty(len(sites), len(metrics))
    per_forward = max(1, max_batch // n)
    with torch.inference_mode(), cache_keyword_fix(model), split_qkv_input(model, split_qkv):
        values[:] = _evaluate(metrics, model(tokens, attention_mask=mask), batch)
        if kv_prefix is None:
            kv_prefix = bool(live) and max(starts[i] for i in live) > 0 and kv_cache_works(
                model, tokens[0, int(batch.pad[0]):].tolist())
        prefix: dict[int, object] = {}
        chunks = [live[i:i + per_forward] for i in range(0, len(live), per_forward)]
        for chunk in tqdm(chunks, desc="patching", unit="forward", disable=not progress):
            offset = min(starts[i] for i in chunk) if kv_prefix else 0
            entries = defaultdict(list)
            for block, i in enumerate(chunk):
                for patch in sites[i]:
                    if patch.start is not None:
                        entries[patch.hook].append((block, patch.setter))
            hooks = [(name, partial(_stacked_hook, entries=e, n=n, offset=offset)) for name, e in entries.items()]
            rows = torch.arange(n, device=tokens.device).repeat(len(chunk))
            full_mask = mask if mask is not None else torch.ones_like(tokens) if offset else None
            kwargs = {"attention_mask": None if full_mask is None else full_mask[rows]}
            if offset:
                if offset not in prefix:  # chunks come in decreasing offset: keep only the current prefix
                    prefix = {offset: model(tokens[:, :offset], attention_mask=kwargs["attention_mask"][:n, :offset],
                                            return_type="logits_and_cache", use_cache=True)[1]}
                kwargs["past_key_values"] = copy.deepcopy(prefix[offset])
                kwargs["past_key_values"].reorder_cache(rows)
            with model.hooks(fwd_hooks=hooks):
                logits = model(tokens[rows, offset:], **kwargs)
            for block, i in enumerate(chunk):
                values[i] = _evaluate(metrics, logits[block * n:(block + 1) * n], batch)
    return values


# -- activation patching ----------------------------------------------------------------------------


def _prepare(model, batch: PairBatch, names: Sequence[str], direction: Direction):
    """The batch with baselines, the target prompts, and source/target activations of ``names`` with their
    ``differences``."""
    check_choice("direction", direction, ("denoising", "noising"))
    batch = batch.to(model.cfg.device)
    with torch.inference_mode():
        clean_logits, clean = _run(model, batch.clean_tokens, batch.attention_mask, names)
        corrupt_logits, corrupt = _run(model, batch.corrupt_tokens, batch.attention_mask, names)
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


def _frame(model, keys: list[tuple], columns: list[str], values: torch.Tensor) -> pd.DataFrame:
    frame = pd.DataFrame(keys, columns=columns).assign(value=values.numpy())
    frame.insert(0, "model", model_label(model))
    return frame


def patch_resid_pre(model, batch: PairBatch, *, metric: Metric = normalised_logit_diff,
                    direction: Direction = "denoising", layers: Sequence[int] | None = None, positions: Positions = "each", **loop) -> pd.DataFrame:
    """Patch ``blocks.{l}.hook_resid_pre`` by layer x position: columns model, layer, position, token, value.

    ``positions``: "each" (every padded index), "all", a role (see ``PairBatch.positions``), an int, or a
    list of these. ``loop`` goes to :func:`generic_patch` (max_batch, kv_prefix, shortcuts, progress)."""
    return _layer_sweep(model, batch, "hook_resid_pre", metric, direction, layers, positions, loop)


def patch_layer_outputs(model, batch: PairBatch, component: Literal["attn_out", "mlp_out"] = "attn_out", *,
                        metric: Metric = normalised_logit_diff, direction: Direction = "denoising",
                        layers: Sequence[int] | None = None, positions: Positions = "all", **loop) -> pd.DataFrame:
    """Patch each layer's attention or MLP output (``hook_attn_out`` / ``hook_mlp_out``) at all or given
    positions: columns model, layer, position, token, value."""
    check_choice("component", component, ("attn_out", "mlp_out"))
    return _layer_sweep(model, batch, f"hook_{component}", metric, direction, layers, positions, loop)


def _layer_sweep(model, batch, hook, metric, direction, layers, positions, loop) -> pd.DataFrame:
    layers = list(range(model.cfg.n_layers) if layers is None else layers)
    names = [f"blocks.{layer}.{hook}" for layer in layers]
    batch, target, source, _, differs = _prepare(model, batch, names, direction)
    where = _position_sites(batch, positions)
    sites = [[copy_patch(name, source[name], differs[name], pos)] for name in names for _, pos in where]
    values = generic_patch(model, batch, sites, {"value": metric}, target=target, **loop)[:, 0]
    tokens = [_token_label(model.tokenizer, batch, pos) for _, pos in where]
    keys = [(layer, label, token) for layer in layers for (label, _), token in zip(where, tokens)]
    return _frame(model, keys, ["layer", "position", "token"], values)


def patch_heads(model, batch: PairBatch, *, metric: Metric = normalised_logit_diff, direction: Direction = "denoising",
                positions: Positions = "all", **loop) -> pd.DataFrame:
    """Patch each head's output (``attn.hook_z``): columns model, layer, head, value (and position when
    ``positions`` names more than one: "each" or a list)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [_z(layer) for layer in range(n_layers)]
    batch, target, source, _, differs = _prepare(model, batch, names, direction)
    where = _position_sites(batch, positions)
    keys = [(layer, label, head) for layer in range(n_layers) for label, _ in where for head in range(n_heads)]
    sites = [[copy_patch(_z(layer), source[_z(layer)], differs[_z(layer)], pos, [head])]
             for layer in range(n_layers) for _, pos in where for head in range(n_heads)]
    values = generic_patch(model, batch, sites, {"value": metric}, target=target, **loop)[:, 0]
    frame = _frame(model, keys, ["layer", "position", "head"], values)
    many = positions == "each" or not isinstance(positions, (str, int, type(None)))
    return frame if many else frame.drop(columns="position")


def _group_patches(source, differs, heads: Mapping[int, list[int]], pos) -> list[Patch]:
    return [copy_patch(_z(layer), source[_z(layer)], differs[_z(layer)], pos, hs) for layer, hs in heads.items()]


def patch_head_groups(model, batch: PairBatch, groups: Mapping[str, Heads], *, metric: Metric = normalised_logit_diff,
                      direction: Direction = "denoising", positions: Positions = "all", **loop) -> pd.DataFrame:
    """Patch each group of (layer, head) together: columns model, group, position, value."""
    groups = {name: _heads(hs) for name, hs in groups.items()}
    names = sorted({_z(layer) for hs in groups.values() for layer in hs})
    batch, target, source, _, differs = _prepare(model, batch, names, direction)
    where = _position_sites(batch, positions)
    sites = [_group_patches(source, differs, hs, pos) for hs in groups.values() for _, pos in where]
    values = generic_patch(model, batch, sites, {"value": metric}, target=target, **loop)[:, 0]
    return _frame(model, [(name, label) for name in groups for label, _ in where], ["group", "position"], values)


# -- path patching ----------------------------------------------------------------------------------


def path_patch(model, batch: PairBatch, senders: Mapping[str, Heads] | Literal["each"], receivers: Heads, *,
               components: Sequence[str] = ("q", "k", "v"), receiver_positions: Positions = "all",
               metric: Metric = normalised_logit_diff, direction: Direction = "denoising", **loop) -> pd.DataFrame:
    """Direct-path patching from sender heads into the receivers' queries, keys or values (module docstring).

    ``senders``: named head groups (each patched as one sender), or "each" for every head of a layer
    below the last receiver's. All receivers are patched together; a receiver at or below a sender's
    layer gets nothing from it. ``receiver_positions``: the receivers' input positions patched ("all" or
    one position spec). Columns: model, sender, layer, head (the sender head; -1 for a group), component, value."""
    by_layer = _heads(receivers)
    for c in components:
        check_choice("component", c, ("q", "k", "v"))
    kv = getattr(model.cfg, "n_key_value_heads", None)
    if kv not in (None, model.cfg.n_heads) and set(components) - {"q"}:
        raise ConfigError(f"{model_label(model)} shares keys and values between query heads (n_key_value_heads="
                         f"{kv}, n_heads={model.cfg.n_heads}); per-head K/V path patching is undefined. "
                         "Use components=('q',).")
    if senders == "each":
        senders = {f"L{l}H{h}": [(l, h)] for l in range(max(by_layer, default=0)) for h in range(model.cfg.n_heads)}
    groups = {name: _heads(hs) for name, hs in senders.items()}
    names = sorted({_z(layer) for hs in groups.values() for layer in hs})
    batch, target, source, tgt, differs = _prepare(model, batch, names, direction)
    where = _position_sites(batch, receiver_positions)
    if len(where) != 1:
        raise ArgumentError(f"receiver_positions takes one position spec, got {receiver_positions!r}.")
    (_, pos), = where
    with torch.inference_mode():
        z_diff = {n: source[n] - tgt[n] for n in names}
    sites, keys = [], []
    for name, heads in groups.items():
        for c in components:
            site = []
            for r_layer, r_heads in by_layer.items():
                upstream = [(layer, hs) for layer, hs in heads.items() if layer < r_layer]
                writes = [(z_diff[_z(layer)], hs, model.blocks[layer].attn.W_O) for layer, hs in upstream]
                starts = [s for layer, hs in upstream if (s := _start(differs[_z(layer)], pos, hs)) is not None]
                setter = partial(add_path_setter, writes=writes, heads=r_heads, pos=pos)
                site.append(Patch(f"blocks.{r_layer}.attn.hook_{c}_input", setter, min(starts, default=None)))
            sites.append(site)
            flat = [(layer, h) for layer, hs in heads.items() for h in hs]
            keys.append((name, *(flat[0] if len(flat) == 1 else (-1, -1)), c))
    values = generic_patch(model, batch, sites, {"value": metric}, target=target, split_qkv=True, **loop)[:, 0]
    return _frame(model, keys, ["sender", "layer", "head", "component"], values)


# -- faithfulness -----------------------------------------------------------------------------------


def faithfulness(model, batch: PairBatch, heads: Heads, *, positions: Sequence[str | int] = DEFAULT_KEY_POSITIONS,
                 reference: PairBatch | None = None, n_random: int = 10, seed: int = 0,
                 metric: Metric = normalised_logit_diff, **loop) -> pd.DataFrame:
    """Mean-ablate every head outside ``heads`` at the key ``positions`` of the clean prompts.

    A head's output at a key position is replaced by its mean at that role over the clean prompts of
    ``reference`` (default: ``batch``); other positions and the MLPs are untouched. Rows: ``full`` (no
    ablation), ``circuit``, ``empty`` (every head ablated) and ``random_0..`` (``n_random`` head sets of the
    circuit's size, drawn with ``seed``). Columns: set, kind, n_heads, accuracy, value (the metric) and
    kept = (value - empty) / (full - empty)."""
    circuit = sorted({(int(l), int(h)) for l, h in heads})
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [_z(layer) for layer in range(n_layers)]
    batch, _, _, clean, _ = _prepare(model, batch, names, "noising")
    ref_batch = batch if reference is None else reference.to(model.cfg.device)
    if reference is None:
        ref = clean
    else:
        with torch.inference_mode():
            ref = _run(model, ref_batch.clean_tokens, ref_batch.attention_mask, names)[1]
    where = [(p, batch.positions(p)) for p in positions]
    rows = torch.arange(len(batch), device=batch.clean_tokens.device)
    means, differs = {}, {}
    with torch.inference_mode():
        for name in names:  # every key position of every row gets its role's mean
            means[name] = clean[name].clone()
            for p, pos in where:
                means[name][rows, pos] = ref[name][torch.arange(len(ref_batch)), ref_batch.positions(p)].mean(0)
            differs[name] = differences(means[name], clean[name])
    everyone = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    rng = np.random.default_rng(seed)
    sets = {"full": everyone, "circuit": circuit, "empty": []}
    for i in range(n_random):
        sets[f"random_{i}"] = [everyone[j] for j in sorted(rng.choice(len(everyone), size=len(circuit), replace=False))]
    sites = [[copy_patch(_z(l), means[_z(l)], differs[_z(l)], pos, hs)
              for l, hs in _heads(set(everyone) - set(kept)).items() for _, pos in where] for kept in sets.values()]
    values = generic_patch(model, batch, sites, {"accuracy": answer_accuracy, "value": metric}, target="clean", **loop)
    frame = pd.DataFrame({"set": list(sets), "kind": [s.split("_")[0] for s in sets],
                          "n_heads": [len(s) for s in sets.values()],
                          "accuracy": values[:, 0].numpy(), "value": values[:, 1].numpy()})
    full, empty = frame.set_index("set").loc[["full", "empty"], "value"]
    return frame.assign(kept=(frame["value"] - empty) / (full - empty))


# -- cross-model activation patching ----------------------------------------------------------------


def cross_model_patch(recipient, donor, batch: PairBatch, groups: Mapping[str, Heads] | None = None, *,
                      per_layer: Literal["heads", "resid_pre"] | None = "heads", positions: Positions = "all",
                      allow_vocab_extension: bool = True, **loop) -> pd.DataFrame:
    """Patch the donor's activations into the recipient on the same (clean) prompts (CMAP).

    Sites: each head group (its heads' ``attn.hook_z``), and per layer either all of its heads
    (``"heads"``, rows ``L{l} heads``) or its residual stream (``"resid_pre"``, rows ``L{l} resid_pre``).
    Accuracy is the first-differing-answer-token proxy (``answer_accuracy``); logit_diff is
    ``logit_diff``. A final ``donor`` row has the donor's own values as ``after``. Columns: group, metric,
    before, after. Raises ``ModelMismatchError`` unless ``check_same_family`` passes."""
    check_same_family(recipient, donor, allow_vocab_extension=allow_vocab_extension)
    batch = batch.to(recipient.cfg.device)
    n_layers = recipient.cfg.n_layers
    groups = {name: _heads(hs) for name, hs in (groups or {}).items()}
    names = [_z(layer) for layer in range(n_layers)] + [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    with torch.inference_mode():
        donor_logits, source = _run(donor, batch.clean_tokens, batch.attention_mask, names)
        source = {n: a.to(recipient.cfg.device, recipient.cfg.dtype) for n, a in source.items()}
        _, target = _run(recipient, batch.clean_tokens, batch.attention_mask, names)
        differs = {n: differences(source[n], target[n]) for n in names}
    where = _position_sites(batch, positions)
    sites, labels = [], []
    suffix = lambda label: "" if len(where) == 1 else f" @ {label}"  # noqa: E731
    for name, heads in groups.items():
        for label, pos in where:
            sites.append(_group_patches(source, differs, heads, pos))
            labels.append(name + suffix(label))
    for layer in range(n_layers) if per_layer else []:
        hook = _z(layer) if per_layer == "heads" else f"blocks.{layer}.hook_resid_pre"
        for label, pos in where:
            sites.append([copy_patch(hook, source[hook], differs[hook], pos)])
            labels.append(f"L{layer} {per_layer}" + suffix(label))
    metrics = {"accuracy": answer_accuracy, "logit_diff": logit_diff}
    values = generic_patch(recipient, batch, [[]] + sites, metrics, target="clean", **loop)
    before, after, donor_values = values[0], values[1:], _evaluate(metrics, donor_logits, batch)
    rows = [(label, m, float(before[j]), float(after[i, j])) for i, label in enumerate(labels)
            for j, m in enumerate(metrics)]
    rows += [("donor", m, float(before[j]), float(donor_values[j])) for j, m in enumerate(metrics)]
    return pd.DataFrame(rows, columns=["group", "metric", "before", "after"])
