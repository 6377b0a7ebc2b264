"""The patching engine: one generic loop (:func:`generic_patch`) with small setters, as
``transformer_lens.patching`` is built, and the exact shortcuts that make sweeps cheap.

A *site* is a list of :class:`Patch` es (a hook name and a setter specialised with
``functools.partial``) applied together in one run. Sites are batched: the target prompts are repeated
once per site along the batch dimension, and each site's setters write only into its block of rows, so
up to ``max_batch`` rows go through one forward pass.

The shortcuts, all exact (each is checked once on the unpatched target run and dropped where it does
not reproduce it):

- a patch that copies an activation identical to the one it replaces changes nothing, so a site runs
  only the pairs it changes (``Patch.row_starts``), from the first position where it changes something
  (``Patch.start``); a site that changes nothing is not run at all (its value is the unpatched run's);
- position skip: a patch at position ``p`` cannot change anything before ``p``, so the positions
  before a chunk's earliest start come from the target run's key-value cache (``kv_prefix``);
- layer skip: a site whose patches all sit at block L or above starts at block L from the target's
  residual stream, under the same attention mask and rotary positions (:func:`position_ids`), and the
  blocks below are not run (:func:`skip_blocks`);
- last-position read: metrics read only the last (answer) position, so the last block's MLP and the
  unembedding run there only (:func:`read_last_hooks`); logits handed to a metric may cover only a
  suffix of the positions, down to the last one, and batches are left-padded;
- sites are grouped into forwards by an estimated cost (:func:`plan_chunks`).

Hooks are added only through ``model.hooks(...)`` / ``run_with_cache(names_filter=...)``, and blocks
are skipped in a context manager, so nothing outlives an exception.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Literal, Mapping, NamedTuple, Sequence

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from boxprobe.behaviour.decoding import cache_keyword_fix, kv_cache_works, row_view
from boxprobe.config import check_choice
from boxprobe.data.pairs import Metric, PairBatch
from boxprobe.models.batching import halve_on_oom
from boxprobe.models.loading import model_label

logger = logging.getLogger(__name__)


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
    ``rows`` covers positions ``offset:``; ``start`` is the first position it changes (None: none);
    ``row_starts`` ([pair], optional) the first position it changes in each pair's row, -1 where it
    changes nothing there (such rows are not run: their values are the unpatched run's)."""

    hook: str
    setter: Callable[[torch.Tensor, int], None]
    start: int | None
    row_starts: torch.Tensor | None = None


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
    """First position a patch over ``pos`` / ``heads`` changes, from ``differences`` ([batch, pos, ...])."""
    return _earliest(_row_starts(differs, pos, heads, column))


def _earliest(row_starts: torch.Tensor) -> int | None:
    """The first position any row changes (None: no row changes)."""
    hit = row_starts >= 0
    return int(row_starts[hit].min()) if bool(hit.any()) else None


def _row_starts(differs: torch.Tensor, pos: torch.Tensor | None, heads: Sequence[int] | None,
                column: int | None = None) -> torch.Tensor:
    """Per row, the first position a patch over ``pos`` / ``heads`` changes (-1: none). ``differs`` is
    [batch, pos, ...], or [batch, k, ...] of chosen positions with ``column`` this patch's index among them."""
    d = differs if heads is None else differs[:, :, list(heads)]
    if pos is None:
        hit = d.reshape(d.shape[0], d.shape[1], -1).any(-1)  # [batch, pos]
        return torch.where(hit.any(1), hit.int().argmax(1), -1)
    pos = pos.to(d.device)
    src = pos if column is None else torch.full_like(pos, column)
    at = d[torch.arange(len(pos), device=d.device), src].reshape(len(pos), -1).any(-1)
    return torch.where(at, pos, -1)


def copy_patch(hook: str, source: Float[torch.Tensor, "batch pos *rest"],
               differs: Bool[torch.Tensor, "batch pos *rest"], pos: Int[torch.Tensor, "batch"] | None = None,
               heads: Sequence[int] | None = None, column: int | None = None) -> Patch:
    """A Patch copying ``source`` into a run; ``differs = differences(source, that run's activation)``
    (``column``: both hold chosen positions only, see :func:`copy_setter`)."""
    rows = _row_starts(differs, pos, heads, column)
    return Patch(hook, partial(copy_setter, source=source, pos=pos, heads=heads, column=column), _earliest(rows), rows)


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
    # entries: (rows of the site in this forward, the pairs they are or None for all n, setter)
    for span, pairs, setter in entries:
        if pairs is None:
            setter(act[span], offset)
        else:  # a setter edits all n pairs' rows; give it them, keep the site's
            full = act.new_zeros((n, *act.shape[1:]))
            full[pairs] = act[span]
            setter(full, offset)
            act[span] = full[pairs]
    return act


def _evaluate(metrics: Mapping[str, Metric], logits, batch: PairBatch) -> torch.Tensor:
    """[metric, pair] values of ``logits``."""
    n = len(batch)
    logits = logits.to(batch.clean_tokens.device)  # the last block's device may not be the batch's
    return torch.stack([torch.as_tensor(f(logits, batch)).float().reshape(-1).expand(n).cpu() for f in metrics.values()])


def _collect_hook(act, hook, *, out: torch.Tensor, sites: list[int], spans: list, pairs: list, offset: int,
                  pos: torch.Tensor):
    # Record each site's activation at its rows' position ``pos``; rows before ``offset``, and pairs the
    # site does not run, keep the target's (prefilled).
    pos = pos.to(act.device)
    for site, span, rows in zip(sites, spans, pairs):
        rows = rows.to(act.device)
        keep = pos[rows] >= offset
        at = torch.arange(span.start, span.stop, device=act.device)[keep]
        out[site, rows[keep].cpu()] = act[at, pos[rows][keep] - offset].to(out.dtype).cpu()
    return act


# The key-value prefix is used (kv_prefix=None) only while it adds at most this share to one forward's
# activation memory: it holds every layer's keys and values for the whole pass, so without a bound the
# peak grows with depth; the alternative (each chunk from its start layer's residual stream at every
# position) holds nothing per layer.
KV_SHARE = 0.1

# Per-forward overhead of the bridge, in row-positions of a full forward (about 10 ms, or 130 rows x
# positions, for the 4-layer toy model on a CPU): what merging sites into one forward saves.
FORWARD_COST = 128


def kv_share(cfg, n_prompts: int, n_pos: int, rows: int) -> float:
    """Keys and values of every layer for ``n_prompts`` target prompts, over one forward's activations at
    ``rows`` rows (estimated: residual stream and attention and MLP intermediates, attention scores)."""
    kv_width = 2 * (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head
    per_token = 4 * cfg.d_model + 2 * (getattr(cfg, "d_mlp", None) or 4 * cfg.d_model) + cfg.n_heads * n_pos
    return cfg.n_layers * n_prompts * kv_width / (rows * per_token)


def position_ids(mask: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"]:
    """The rotary positions TransformerBridge derives from a left-padded mask (``transformer_bridge.forward``):
    counted from each row's first real token; rows without left padding keep ``arange``. A forward that
    starts from a residual stream (``start_at_layer``) gets no such derivation, so it is passed in."""
    derived = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    arange = torch.arange(mask.shape[1], device=mask.device).expand_as(derived)
    needs = ((derived != arange) & (mask != 0)).any(-1, keepdim=True)
    return torch.where(needs, derived, arange)


@contextmanager
def skip_blocks(model, n: int) -> Iterator[None]:
    """While active, blocks ``0..n-1`` return their input without computing anything.

    ``start_at_layer=n`` alone still runs those blocks (on the injected residual) and then discards their
    output; with this their cost is gone too. Their hooks still fire, on the passed-through value."""

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    inner = [block.original_component for block in list(model.blocks)[:n]]
    try:
        for module in inner:
            module.forward = passthrough  # an instance attribute shadows the class's forward
        yield
    finally:
        for module in inner:
            module.__dict__.pop("forward", None)


def _last_only(act, hook):
    return act[:, -1:]


def read_last_hooks(model) -> list[tuple[str, Callable]]:
    """Hooks that compute the last block's MLP and the unembedding at the last position only (metrics
    read only it; the last block's keys and values, which earlier positions still need, come before)."""
    return [(f"blocks.{model.cfg.n_layers - 1}.mlp.hook_in", _last_only), ("ln_final.hook_in", _last_only)]


_AFTER_LAST_MLP_IN = re.compile(r"(hook_out|hook_resid_post|hook_resid_mid|hook_mlp_in|hook_mlp_out|ln2\.|mlp\.)")


def _before_read_last(name: str, n_layers: int) -> bool:
    """Whether a hook fires before the :func:`read_last_hooks` slice (so its activation has every position)."""
    m = re.match(r"blocks\.(\d+)\.(.*)", name)
    if not m:
        return not name.startswith(("ln_final", "unembed"))
    return int(m.group(1)) < n_layers - 1 or not _AFTER_LAST_MLP_IN.match(m.group(2))


def plan_chunks(live: Sequence[int], starts: Sequence[int], layer_of: Sequence[int], rows_of: Sequence[int],
                n_pos: int, n_layers: int, max_rows: int) -> list[list[int]]:
    """Sites grouped into forwards: each chunk shares one start layer, its sites are neighbours in start
    position and have at most ``max_rows`` rows together (or are one site), and the chunk boundaries
    minimise the estimated cost (a dynamic programme per layer): rows x positions from the chunk's
    earliest start x the share of layers run, plus ``FORWARD_COST`` per forward."""
    chunks = []
    for layer in sorted({layer_of[i] for i in live}):
        sites = sorted((i for i in live if layer_of[i] == layer), key=lambda i: -starts[i])
        share = (n_layers - layer) / n_layers
        best, cut = [0.0], [0]
        for j in range(1, len(sites) + 1):
            width = n_pos - starts[sites[j - 1]]
            cost, choice, rows, i = float("inf"), j - 1, 0, j
            while i > 0 and (i == j or rows + rows_of[sites[i - 1]] <= max_rows):
                i -= 1
                rows += rows_of[sites[i]]
                option = best[i] + FORWARD_COST + rows * width * share
                if option < cost:
                    cost, choice = option, i
            best.append(cost)
            cut.append(choice)
        j, out = len(sites), []
        while j:
            out.append(sites[cut[j]:j])
            j = cut[j]
        chunks += out[::-1]
    return chunks


class _Target(NamedTuple):
    """The unpatched target run's reusable state: tokens, mask, rotary positions, key-value cache and
    residual streams (block -> [batch, pos, d_model]) that chunks start from."""

    tokens: torch.Tensor
    mask: torch.Tensor | None
    positions: torch.Tensor
    kv: object | None
    resid: dict
    resid_from: int = 0
    """The first position kept in ``resid`` (no chunk starts before it)."""


def _forward(model, target: _Target, rows: torch.Tensor, offset: int, first: int, hooks: list,
             read_last: bool) -> torch.Tensor:
    """Logits of ``target``'s ``rows`` from position ``offset`` and block ``first`` on, with ``hooks``."""
    tokens, mask = target.tokens, target.mask
    kwargs = {"attention_mask": None if mask is None else mask[rows], "logits_to_keep": 1}
    if offset:  # the target's own keys and values before the chunk's first change, never copied per row
        kwargs["past_key_values"] = row_view(target.kv, rows, offset)
    inputs = tokens[rows, offset:]
    if first:
        resid = target.resid[first]
        inputs, kwargs["start_at_layer"] = resid[rows.to(resid.device), offset - target.resid_from:], first
        kwargs["position_ids"] = target.positions[rows, offset:]
    hooks = hooks + (read_last_hooks(model) if read_last else [])
    with model.hooks(fwd_hooks=hooks), skip_blocks(model, first):
        return model(inputs, **kwargs)


def _shortcuts_exact(model, target: _Target, logits: torch.Tensor, offset: int, first: int, read_last: bool) -> bool:
    """Whether an unpatched forward through the shortcuts reproduces the target's last-position logits."""
    n = target.tokens.shape[0]
    try:
        got = _forward(model, target, torch.arange(n, device=target.tokens.device), offset, first, [], read_last)
    except Exception as err:  # an architecture whose blocks cannot be skipped or sliced
        logger.warning("patching shortcuts unavailable for %s (%s); running every block", model_label(model), err)
        return False
    ref = logits[:, -1].float()
    tol = (1e-4 if ref.dtype == torch.float32 and logits.dtype == torch.float32 else 5e-2) * ref.abs().max().item()
    ok = got.shape[0] == n and torch.allclose(got[:, -1].float(), ref, atol=tol, rtol=0)
    if not ok:
        logger.warning("patching shortcuts do not reproduce %s's logits; running every block", model_label(model))
    return bool(ok)


@halve_on_oom("max_batch", "patching")  # reruns with half the rows per forward on out-of-memory
def generic_patch(model, batch: PairBatch, sites: Sequence[Sequence[Patch]], metrics: Mapping[str, Metric], *,
                  target: Literal["clean", "corrupt"], max_batch: int = 64, kv_prefix: bool | None = None,
                  split_qkv: bool = False, shortcuts: bool = True, progress: bool = True,
                  collect: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                  skip_layers: bool | None = None, read_last: bool | None = None) -> Float[torch.Tensor, "site metric pair"]:
    """Each metric, per pair, with each site's patches applied to the ``target`` prompts.

    ``collect``: hook name -> (pos [pair], out [site, pair, ...]); each site's activation of that hook at
    ``pos`` is written into ``out`` (prefilled by the caller with the unpatched run's values, which rows
    whose ``pos`` lies in a cached prefix keep).

    ``max_batch``: rows per forward (the pairs each site changes, summed over its sites; at least one
    site). The exact shortcuts (module docstring), each checked once on the unpatched target run and
    dropped (with a warning) where it does not reproduce it, beside skipping the pairs a site leaves
    unchanged (always with ``shortcuts``):
    ``kv_prefix`` reuses the target's key-value cache before each chunk's first changed position (None:
    when ``kv_cache_works`` and it adds at most ``KV_SHARE`` to a forward's activation memory,
    :func:`kv_share`, so that the peak does not grow with depth); ``skip_layers`` starts a site whose
    patches and collected hooks all sit at block L or above at block L, from the target's residual stream
    under the same mask and rotary positions, without running the blocks below (None: when the target's
    residual streams at those layers fit in 512 MiB); ``read_last`` computes the last block's MLP and the logits at the last
    position only (None: when no patch or collected hook sits after that point). ``shortcuts=False`` runs
    every site over every pair, position and block (no skipping, no cache), for comparison."""
    check_choice("target", target, ("clean", "corrupt"))
    tokens, mask = (batch.clean_tokens if target == "clean" else batch.corrupt_tokens), batch.attention_mask
    n, n_layers = tokens.shape[0], model.cfg.n_layers
    if shortcuts:
        starts = [min((p.start for p in site if p.start is not None), default=None) for site in sites]
    else:
        starts, kv_prefix, skip_layers, read_last = [0] * len(sites), False, False, False
        sites = [[p._replace(start=0, row_starts=None) for p in site] for site in sites]
    names = {p.hook for site in sites for p in site} | set(collect or {})
    if read_last is None:
        read_last = all(_before_read_last(name, n_layers) for name in names)
    # A site whose patches all sit at layer L or above leaves layers below L as in the target run.
    floor = min((_hook_layer(name) for name in (collect or {})), default=n_layers)
    layer_of = [min([_hook_layer(p.hook) for p in site if p.start is not None] + [floor]) for site in sites]
    live = [i for i, s in enumerate(starts) if s is not None]
    values = torch.empty(len(sites), len(metrics), n)
    pairs_of = [_site_pairs(site, n) for site in sites]
    rows_of = [n if p is None else len(p) for p in pairs_of]
    with torch.inference_mode(), cache_keyword_fix(model), split_qkv_input(model, split_qkv):
        if kv_prefix is None:
            widest = min(max(max_batch, n), sum(rows_of[i] for i in live) or 1)  # rows of the largest forward
            kv_prefix = (bool(live) and max(starts[i] for i in live) > 0
                         and kv_share(model.cfg, n, tokens.shape[1], widest) <= KV_SHARE
                         and kv_cache_works(model, tokens[0, int(batch.pad[0]):].tolist()))
        needed = sorted({layer_of[i] for i in live} - {0, n_layers})
        if skip_layers is None:  # the target's residual stream at each start layer is kept for the whole batch
            skip_layers = tokens.numel() * model.cfg.d_model * len(needed) * 4 <= 2 ** 29
        # Without the key-value prefix a chunk starts from the residual stream at every position, which is
        # as exact and keeps no per-layer state beyond the start layers.
        needed = needed if skip_layers else []
        resid: dict[int, torch.Tensor] = {}
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
                logits, full_kv = model(tokens, attention_mask=mask, logits_to_keep=1), None
        values[:] = _evaluate(metrics, logits, batch)
        state = _Target(tokens, mask, position_ids(mask if mask is not None else torch.ones_like(tokens)), full_kv,
                        resid, lo)
        if live and (needed or read_last):
            check_offset = min(max(starts[i] for i in live), tokens.shape[1] - 1) if kv_prefix else 0
            if not _shortcuts_exact(model, state, logits, check_offset, max(needed, default=0), read_last):
                needed, read_last = [], False
        if not needed:
            layer_of = [0] * len(sites)
        chunks = plan_chunks(live, [s or 0 for s in starts], layer_of, rows_of, tokens.shape[1], n_layers,
                             max(max_batch, n))
        everyone = torch.arange(n, device=tokens.device)
        for chunk in tqdm(chunks, desc="patching", unit="forward", disable=not progress):
            offset = min(starts[i] for i in chunk) if kv_prefix else 0
            first = min(layer_of[i] for i in chunk)
            spans, pairs, lo = [], [], 0
            for i in chunk:
                spans.append(slice(lo, lo + rows_of[i]))
                pairs.append(everyone if pairs_of[i] is None else pairs_of[i].to(tokens.device))
                lo += rows_of[i]
            entries = defaultdict(list)
            for i, span, rows in zip(chunk, spans, pairs):
                for patch in sites[i]:
                    if patch.start is not None:
                        entries[patch.hook].append((span, None if pairs_of[i] is None else rows, patch.setter))
            hooks = [(name, partial(_stacked_hook, entries=e, n=n, offset=offset)) for name, e in entries.items()]
            hooks += [(name, partial(_collect_hook, out=out, sites=chunk, spans=spans, pairs=pairs, offset=offset,
                                     pos=pos)) for name, (pos, out) in (collect or {}).items()]
            out_logits = _forward(model, state, torch.cat(pairs), offset, first, hooks, read_last)
            for i, span, rows in zip(chunk, spans, pairs):
                if pairs_of[i] is None:
                    values[i] = _evaluate(metrics, out_logits[span], batch)
                else:  # pairs the site leaves unchanged read the unpatched run (metrics read the last position)
                    full = logits[:, -1:].clone()
                    full[rows] = out_logits[span, -1:]
                    values[i] = _evaluate(metrics, full, batch)
    return values


def _site_pairs(site: Sequence[Patch], n: int) -> torch.Tensor | None:
    """The pairs a site changes (None: all n, or unknown because a patch gives no ``row_starts``)."""
    if any(p.row_starts is None for p in site if p.start is not None):
        return None
    changed = torch.zeros(n, dtype=torch.bool)
    for p in site:
        if p.start is not None:
            changed |= (p.row_starts >= 0).cpu()
    return None if bool(changed.all()) else torch.nonzero(changed)[:, 0]


def _hook_layer(name: str) -> int:
    """The block a hook belongs to (0 for hooks before the first block)."""
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else 0
