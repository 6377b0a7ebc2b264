"""Path patching: the effect of sender heads on receivers (heads' queries, keys or values, or the logits).

Two variants, each labelled in the results' ``variant`` column:

``direct``  The senders' source-minus-target output ``(z_source - z_target) @ W_O`` is added to the
            receivers' own copy of the residual stream feeding their query, key or value
            (``attn.hook_{q,k,v}_input``; the block's norm is recomputed), or, for ``receivers="logits"``,
            to the final residual stream. Every other reader sees the target run: paths through MLPs
            and other heads do not count. (As ``transformer_lens.patching.get_act_patch_direct_path``.)
``freeze``  Prakash et al.'s variant (Nix07/finetuning ``path_patching/pp_utils.py``, ``patching_heads``
            then ``patching_receiver_heads``): run 1 patches the senders' outputs and FREEZES every other
            head's output to the target run, while the MLPs recompute; the receivers' inputs of run 1
            (``blocks.{l}.hook_resid_pre``, i.e. what feeds their q/k/v) are recorded. Run 2 is the target
            run with only the receivers' q/k/v inputs replaced by the recorded ones. Paths
            sender -> MLPs -> receiver count; paths through other heads do not. With
            ``receivers="logits"`` run 1's own logits are the result (sender -> MLPs -> unembedding).

A head's output at position p reaches a receiver's input at p only (attention of other heads is the
only way across positions, and those are frozen or left out), so senders are patched at the receivers'
positions.

Grouped-query attention (SmolLM2: 9 query heads over 3 key-value heads). Senders are query heads (each
has its own ``hook_z`` slot and W_O block). Query receivers are query heads. Key and value receivers:
``hook_{k,v}_input`` exist per KEY-VALUE head, so a k/v receiver (layer, h) is patched at its KV head
``h // (n_heads // n_key_value_heads)``, which changes the keys/values of every query head sharing it;
the ``receiver_kv_heads`` column names the KV heads patched.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, Mapping, Sequence

import pandas as pd
import torch

from boxprobe.causal.patching import (Direction, Heads, Metric, PairBatch, Patch, Positions, _frame, _heads,
                                      _position_sites, _prepare, _start, _z, add_path_setter,
                                      generic_patch, normalised_logit_diff)
from boxprobe.config import check_choice
from boxprobe.errors import ArgumentError

Variant = Literal["direct", "freeze"]
VARIANTS = ("direct", "freeze")


def kv_head(model, head: int) -> int:
    """The key-value head a query head reads under grouped-query attention (itself without GQA)."""
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    return int(head) // (model.cfg.n_heads // n_kv)


def _receiver_slots(model, heads: Sequence[int], component: str) -> list[int]:
    return sorted(set(heads)) if component == "q" else sorted({kv_head(model, h) for h in heads})


def _final_hook(model) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def _final_add_setter(act, offset: int, *, writes, pos) -> None:
    # As add_path_setter, for the final residual stream [batch, pos, d_model].
    delta = sum(torch.einsum("bphd,hdm->bpm", z[:, offset:, hs].to(w.device), w[hs]).to(act.device)
                for z, hs, w in writes)
    if pos is not None:
        at = torch.arange(offset, act.shape[1] + offset, device=act.device)[None, :] == pos.to(act.device)[:, None]
        delta = delta * at[..., None]
    act += delta.to(act.dtype)


def _freeze_setter(act, offset: int, *, target, source, heads, pos) -> None:
    """Every head's output from ``target`` except ``heads``, which get ``source`` at ``pos`` (or everywhere)."""
    target, source = target.to(act.device), source.to(act.device)  # no-ops unless blocks sit on several devices
    pos = None if pos is None else pos.to(act.device)
    act[:] = target[:, offset:]
    if heads:
        h = torch.as_tensor(list(heads), device=act.device)
        if pos is None:
            act[:, :, h] = source[:, offset:, h]
        else:
            rows = torch.arange(act.shape[0], device=act.device)
            keep = pos >= offset
            rows, p = rows[keep], pos[keep]
            act[rows[:, None], (p - offset)[:, None], h[None, :]] = source[rows[:, None], p[:, None], h[None, :]]


def _copy_input_setter(act, offset: int, *, resid, slots, pos) -> None:
    # Replace the receivers' q/k/v input [batch, pos, head, d_model] at ``pos`` by the recorded residual [batch, d_model].
    rows, pos, resid = torch.arange(act.shape[0], device=act.device), pos.to(act.device), resid.to(act.device)
    keep = pos >= offset
    rows, p = rows[keep], pos[keep]
    h = torch.as_tensor(slots, device=act.device)
    act[rows[:, None], (p - offset)[:, None], h[None, :]] = resid[rows].to(act.dtype)[:, None, :]


def path_patch(model, batch: PairBatch, senders: Mapping[str, Heads] | Literal["each"],
               receivers: Heads | Literal["logits"], *, components: Sequence[str] = ("q", "k", "v"),
               receiver_positions: Positions = "all", variant: Variant = "direct",
               metric: Metric = normalised_logit_diff, direction: Direction = "denoising", per_pair: bool = False,
               **loop) -> pd.DataFrame:
    """Path patching from sender heads into the receivers' queries, keys or values, or into the logits.

    ``senders``: named head groups (each patched as one sender), or "each" for every head of a layer
    below the last receiver's (every layer for the logits). All receivers are patched together; a
    receiver at or below a sender's layer gets nothing from it. ``receiver_positions``: the receivers'
    input positions ("all" or one position spec; the freeze variant needs one position). ``variant``:
    see the module docstring. Columns: model, variant, sender, layer, head_index (the sender head; -1
    for a group), component ("logits" for the logits), receiver_kv_heads, metric, value and the
    interval columns (or per pair)."""
    check_choice("variant", variant, VARIANTS)
    to_logits = isinstance(receivers, str)
    if to_logits:
        check_choice("receivers", receivers, ("logits",))
        by_layer, components = {model.cfg.n_layers: []}, ("logits",)
    else:
        by_layer = _heads(receivers)
        for c in components:
            check_choice("component", c, ("q", "k", "v"))
    if senders == "each":
        senders = {f"L{l}H{h}": [(l, h)] for l in range(max(by_layer, default=0)) for h in range(model.cfg.n_heads)}
    groups = {name: _heads(hs) for name, hs in senders.items()}
    n_layers = model.cfg.n_layers
    names = ([_z(layer) for layer in range(n_layers)] if variant == "freeze"
             else sorted({_z(layer) for hs in groups.values() for layer in hs}))
    batch, target, source, tgt, differs = _prepare(model, batch, names, direction)
    where = _position_sites(batch, receiver_positions)
    if len(where) != 1:
        raise ArgumentError(f"receiver_positions takes one position spec, got {receiver_positions!r}.")
    (_, pos), = where
    if variant == "freeze" and pos is None:
        raise ArgumentError("The freeze variant patches one receiver position; give receiver_positions a role "
                            "(e.g. 'answer_prefix') or an index.")
    if variant == "direct":
        values, keys = _direct(model, batch, groups, by_layer, components, pos, target, source, tgt, differs,
                               metric, to_logits, loop)
    else:
        values, keys = _freeze(model, batch, groups, by_layer, components, pos, target, source, tgt, differs,
                               metric, to_logits, loop)
    frame = _frame(model, keys, ["sender", "layer", "head_index", "component", "receiver_kv_heads"], values, batch,
                   metric, per_pair)
    frame.insert(1, "variant", variant)
    return frame


def _key(model, name, heads, c, by_layer):
    flat = [(layer, h) for layer, hs in heads.items() for h in hs]
    kv = "" if c in ("q", "logits") else ";".join(
        f"{layer}.{s}" for layer, hs in by_layer.items() for s in _receiver_slots(model, hs, c))
    return (name, *(flat[0] if len(flat) == 1 else (-1, -1)), c, kv)


def _direct(model, batch, groups, by_layer, components, pos, target, source, tgt, differs, metric, to_logits, loop):
    with torch.inference_mode():
        z_diff = {n: source[n] - tgt[n] for n in source}
    sites, keys = [], []
    for name, heads in groups.items():
        for c in components:
            site = []
            for r_layer, r_heads in by_layer.items():
                upstream = [(layer, hs) for layer, hs in heads.items() if layer < r_layer]
                writes = [(z_diff[_z(layer)], hs, model.blocks[layer].attn.W_O) for layer, hs in upstream]
                starts = [s for layer, hs in upstream if (s := _start(differs[_z(layer)], pos, hs)) is not None]
                if to_logits:
                    setter, hook = partial(_final_add_setter, writes=writes, pos=pos), _final_hook(model)
                else:
                    slots = _receiver_slots(model, r_heads, c)
                    setter = partial(add_path_setter, writes=writes, heads=slots, pos=pos)
                    hook = f"blocks.{r_layer}.attn.hook_{c}_input"
                site.append(Patch(hook, setter, min(starts, default=None)))
            sites.append(site)
            keys.append(_key(model, name, heads, c, by_layer))
    values = generic_patch(model, batch, sites, {"value": metric}, target=target, split_qkv=not to_logits, **loop)
    return values[:, 0], keys


def _freeze(model, batch, groups, by_layer, components, pos, target, source, tgt, differs, metric, to_logits, loop):
    n_layers = model.cfg.n_layers
    run1 = []
    for heads in groups.values():
        starts = [s for layer, hs in heads.items() if (s := _start(differs[_z(layer)], pos, hs)) is not None]
        start = min(starts, default=None)
        run1.append([Patch(_z(layer), partial(_freeze_setter, target=tgt[_z(layer)], source=source[_z(layer)],
                                              heads=heads.get(layer, []), pos=pos), start)
                     for layer in range(n_layers)])
    r_layers = [layer for layer in by_layer if layer < n_layers]
    rows = torch.arange(len(batch), device=pos.device)
    collect = {}
    if not to_logits:
        with torch.inference_mode():
            _, base = model.run_with_cache(batch.clean_tokens if target == "clean" else batch.corrupt_tokens,
                                           attention_mask=batch.attention_mask,
                                           names_filter=[f"blocks.{layer}.hook_resid_pre" for layer in r_layers])
        for layer in r_layers:
            name = f"blocks.{layer}.hook_resid_pre"
            collect[name] = (pos, base[name][rows, pos].cpu()[None].repeat(len(run1), 1, 1).clone())
    values1 = generic_patch(model, batch, run1, {"value": metric}, target=target, collect=collect, **loop)
    keys = [_key(model, name, heads, c, by_layer) for name, heads in groups.items() for c in components]
    if to_logits:
        return values1[:, 0], keys
    sites = []
    for i, heads in enumerate(groups.values()):
        for c in components:
            site = []
            for layer, r_heads in by_layer.items():
                recorded, orig = collect[f"blocks.{layer}.hook_resid_pre"][1][i], base[f"blocks.{layer}.hook_resid_pre"][rows, pos].cpu()
                changed = (recorded != orig).any(-1)
                start = int(pos[changed.to(pos.device)].min()) if changed.any() else None
                setter = partial(_copy_input_setter, resid=recorded.to(pos.device), slots=_receiver_slots(model, r_heads, c),
                                 pos=pos)
                site.append(Patch(f"blocks.{layer}.attn.hook_{c}_input", setter, start))
            sites.append(site)
    values = generic_patch(model, batch, sites, {"value": metric}, target=target, split_qkv=True, **loop)
    return values[:, 0], keys
