"""Batched forward passes for evaluation: tokenizing queries, padding, the shared-context key-value cache,
teacher-forced (fast) and greedy (generate) batches.

TransformerBridge 4.3's attention bridges read the cache from the ``past_key_values`` keyword while
transformers 5 passes it as ``cache``; the cache then stays empty and cached logits are silently
wrong. :func:`cache_keyword_fix` copies the keyword while evaluation runs, and :func:`kv_cache_works`
checks on the data that cached and uncached logits agree before the cache is relied on.
"""

from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from transformer_lens.model_bridge import TransformerBridge
from transformers.cache_utils import DynamicCache, DynamicLayer

from boxprobe.data.queries import EncodedQuery
from boxprobe.models.loading import model_context_length, model_label

logger = logging.getLogger(__name__)


def stop_ids(tokenizer) -> set[int]:
    """Tokens that end a generation: any whose text holds "." or a newline, and EOS."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    stops = {i for i, t in enumerate(texts) if "." in t or "\n" in t}
    return stops | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


# -- key-value cache -------------------------------------------------------------------------------


@contextmanager
def cache_keyword_fix(model: TransformerBridge) -> Iterator[None]:
    """While active, hand transformers 5's ``cache=`` keyword to TransformerBridge attention as ``past_key_values``."""

    def copy_keyword(module, args, kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return args, kwargs

    handles = [m.register_forward_pre_hook(copy_keyword, with_kwargs=True)
               for m in model.modules() if hasattr(m, "_update_kv_cache")]
    try:
        with warnings.catch_warnings():  # the bridge still passes transformers the old keyword name
            warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
            yield
    finally:
        for h in handles:
            h.remove()


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str,
             device) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def forward_logits(model, ids, mask, cache=None, keep: int | None = None) -> tuple[Float[torch.Tensor, "batch pos d_vocab"], Any]:
    """Logits (of the last ``keep`` positions only, if given: the unembedding is a large share of a small
    model's cost) and the key-value cache, created or extended."""
    extra = {} if keep is None else {"logits_to_keep": keep}
    if cache is None:
        return model(ids, attention_mask=mask, return_type="logits_and_cache", use_cache=True, **extra)
    return model(ids, attention_mask=mask, past_key_values=cache, **extra), cache


def kv_cache_works(model: TransformerBridge, tokens: Sequence[int]) -> bool:
    """Whether logits computed through the key-value cache match a plain forward on ``tokens``."""
    tokens = list(tokens)[:64]
    if len(tokens) < 2:
        return False
    device, half = model.cfg.device, len(tokens) // 2
    ids = torch.tensor([tokens], device=device)
    ones = torch.ones_like(ids)
    try:
        with torch.inference_mode(), cache_keyword_fix(model):
            ref = model(ids, attention_mask=ones)
            _, cache = forward_logits(model, ids[:, :half], ones[:, :half])
            cached, _ = forward_logits(model, ids[:, half:], ones, cache)
    except Exception as err:  # an architecture whose bridge has no cache support
        logger.warning("key-value cache unavailable for %s (%s); evaluating without it", model_label(model), err)
        return False
    tol = 1e-3 if ref.dtype == torch.float32 else 5e-2
    return bool(torch.allclose(cached.float(), ref[:, half:].float(), atol=tol * ref.float().abs().max().item(), rtol=0))


class _RowView(DynamicLayer):
    """One layer of a shared prefix cache seen by other rows: ``update`` returns the prefix's keys and values
    for ``rows`` joined with the new ones, and stores nothing, so a suffix pass keeps no per-row copy of every
    layer (one layer's expansion lives at a time)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.rows = keys, values, rows.to(keys.device)
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        # the new states' device: under a device map a layer's cache and its block may sit apart
        keys = self.keys[self.rows].to(key_states.device, key_states.dtype)
        values = self.values[self.rows].to(value_states.device, value_states.dtype)
        return torch.cat([keys, key_states], -2), torch.cat([values, value_states], -2)


def row_view(cache: DynamicCache, rows: Int[torch.Tensor, "rows"], length: int | None = None) -> DynamicCache:
    """A read-only cache over the first ``length`` positions (all: None) of ``cache`` for batch rows ``rows``.

    Equal to ``deepcopy`` + ``crop`` + ``reorder_cache(rows)`` for one forward pass, without copying the
    prefix once per row and layer: the view's memory is one layer's expansion, not the model's depth in
    copies. A pass through it leaves ``cache`` unchanged, so one prefix serves any number of passes."""
    end = slice(None) if length is None else slice(0, length)
    view = copy.copy(cache)  # same class and settings, its own list of layers
    view.layers = [_RowView(layer.keys[:, :, end], layer.values[:, :, end], rows) for layer in cache.layers]
    return view


# -- batched passes -------------------------------------------------------------------------------


def prefix_cache(model, chunks: list[list[EncodedQuery]], shared: list[int], pad_id: int, grow: bool = False):
    """Run each chunk's shared prefix once; return its cache with one row per item, and the mask: a read-only
    view (:func:`row_view`) for one pass, or with ``grow`` (decoding extends it) a copy per row."""
    ids, mask = pad_rows([c[0].prompt[:p] for c, p in zip(chunks, shared)], pad_id, "left", model.cfg.device)
    _, cache = forward_logits(model, ids, mask, keep=1)  # the prefix's logits are never read
    rows = torch.tensor([i for i, c in enumerate(chunks) for _ in c], device=ids.device)
    if grow:
        cache.reorder_cache(rows)
        return cache, mask[rows]
    return row_view(cache, rows), mask[rows]


def shared_lengths(chunks: list[list[EncodedQuery]], reuse: bool) -> list[int]:
    out = []
    for c in chunks:
        n = min(len(it.prompt) for it in c) - 1  # keep one prompt token per query for the suffix pass
        for it in c[1:]:
            n = next((i for i, (a, b) in enumerate(zip(c[0].prompt[:n], it.prompt)) if a != b), n)
        out.append(n if reuse else 0)
    return out


def fast_batch(model, chunks: list[list[EncodedQuery]], reuse: bool, pad_id: int) -> list[list[int]]:
    """Per item, the argmax token at each gold position, with the gold teacher-forced (one pass)."""
    items = [it for c in chunks for it in c]
    shared = shared_lengths(chunks, reuse)
    p_of = [p for c, p in zip(chunks, shared) for _ in c]
    rows = [it.prompt[p:] + it.gold[:-1] for it, p in zip(items, p_of)]
    if reuse:
        cache, pmask = prefix_cache(model, chunks, shared, pad_id)
        ids, mask = pad_rows(rows, pad_id, "right", model.cfg.device)
        logits, _ = forward_logits(model, ids, torch.cat([pmask, mask], 1), cache)
        starts = [len(it.prompt) - p - 1 for it, p in zip(items, p_of)]
    else:
        ids, mask = pad_rows(rows, pad_id, "left", model.cfg.device)
        logits = model(ids, attention_mask=mask)
        starts = [ids.shape[1] - len(it.gold) for it in items]
    top = logits.argmax(-1).cpu()
    return [top[i, s: s + len(it.gold)].tolist() for i, (it, s) in enumerate(zip(items, starts))]


def generate_batch(model, chunks: list[list[EncodedQuery]], reuse: bool, use_cache: bool, pad_id: int,
                   max_new_tokens: int, stops: set[int], constraint=None, states=None) -> list[list[int]]:
    """Greedy continuations, each up to and including its first stop token.

    With ``constraint`` (:class:`boxprobe.behaviour.constrained.RegexConstraint`, ``states`` its start state
    per item) the argmax is over the allowed tokens, and a row also ends where the match cannot go on.
    """
    items = [it for c in chunks for it in c]
    device, n_ctx = model.cfg.device, model_context_length(model)
    shared = shared_lengths(chunks, reuse and use_cache)
    p_of = [p for c, p in zip(chunks, shared) for _ in c]
    ids, mask = pad_rows([it.prompt[p:] for it, p in zip(items, p_of)], pad_id, "left", device)
    if reuse and use_cache:
        cache, pmask = prefix_cache(model, chunks, shared, pad_id, grow=True)
        mask = torch.cat([pmask, mask], 1)
        logits, cache = forward_logits(model, ids, mask, cache)
    elif use_cache:
        logits, cache = forward_logits(model, ids, mask)
    else:
        logits, cache = model(ids, attention_mask=mask), None
    limits = [min(max_new_tokens, n_ctx - len(it.prompt) + 1) for it in items]  # the last token is never input
    out: list[list[int]] = [[] for _ in items]
    done = [lim <= 0 for lim in limits]
    stop_t = torch.tensor(sorted(stops), device=device)
    states = list(states) if states is not None else [None] * len(items)
    while True:
        last = logits[:, -1]
        if constraint is not None:
            allowed = torch.stack([constraint.allowed(s) for s in states]).to(last.device)
            last = last.masked_fill(~allowed, float("-inf"))
            blocked = (~allowed.any(-1)).tolist()
        nxt = last.argmax(-1)
        is_stop = torch.isin(nxt, stop_t).tolist()
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if constraint is not None and blocked[i]:  # nothing allowed: the match cannot go on
                done[i] = True
                continue
            out[i].append(tok)
            done[i] = is_stop[i] or len(out[i]) >= limits[i]
            if constraint is not None:
                states[i] = constraint.advance(states[i], tok)
                done[i] = done[i] or constraint.finished(states[i])
        if all(done):
            return out
        step = torch.where(torch.tensor(done, device=device), torch.full_like(nxt, pad_id), nxt)[:, None]
        mask = torch.cat([mask, torch.ones_like(step)], 1)
        if cache is not None:
            logits, _ = forward_logits(model, step, mask, cache)
        else:
            ids = torch.cat([ids, step], 1)
            logits = model(ids, attention_mask=mask)


def batches_by_context(items: list[EncodedQuery], batch_size: int) -> list[list[list[EncodedQuery]]]:
    """Group consecutive queries of one context into chunks (at most batch_size), chunks into batches."""
    chunks: list[list[EncodedQuery]] = []
    for it in items:
        last = chunks[-1] if chunks else None
        if last and len(last) < batch_size and last[0].query.examples[0].context == it.query.examples[0].context:
            last.append(it)
        else:
            chunks.append([it])
    batches, current = [], []
    for c in chunks:
        if current and sum(map(len, current)) + len(c) > batch_size:
            batches.append(current)
            current = []
        current.append(c)
    return batches + ([current] if current else [])
