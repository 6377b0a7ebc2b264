"""Greedy decoding's own answers at the cost of about one teacher-forced pass: speculative decoding
with the gold answer as the draft, over a key-value cache shared at three levels.

Greedy decoding is a function of the prefix: as long as its argmax equals the gold token it has
produced the gold so far, so one pass that teacher-forces the gold shows every position where greedy
would follow the gold, the first position where it would not, and (the argmax there) the token it
writes instead. Only queries that diverge before their first stop token are decoded further, from the
divergence on, reusing that pass's cache: the gold tokens after the divergence are masked out of the
attention (TransformerBridge derives position ids from the mask, so the next token gets the position
right after the kept prefix) rather than cropped, because each row of a batch diverges elsewhere.
The result is token for token what :func:`boxprobe.behaviour.decoding.generate_batch` returns, up to
floating-point differences between padded layouts when two logits tie.

The prompt is computed in three parts: the prefix every query of the run shares (instruction and
demonstrations) once per run (:class:`SharedPrefix`), each context's description once per batch
chunk, and each query's suffix (its statement, the gold) in the batch. :class:`TokenCount` records
the positions computed, padding included, against what an unpadded per-prompt greedy run computes.

With ``constraint`` (a :class:`boxprobe.behaviour.constrained.RegexConstraint`) the argmax is taken
over the allowed tokens at every position, the draft included, as outlines' regex generator does with
a greedy sampler (najoungkim/code-models-entity-tracking ``src/main_autoregressive.py`` ``main``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from boxprobe.behaviour.decoding import EncodedQuery, forward_logits, pad_rows, shared_lengths
from boxprobe.models.loading import model_context_length


@dataclass
class TokenCount:
    """Positions run through the model (padding included) vs an unpadded per-prompt greedy run."""

    computed: int = 0
    per_prompt: int = 0

    @property
    def ratio(self) -> float | None:
        return self.per_prompt / self.computed if self.computed else None


class SharedPrefix:
    """The token prefix all queries of a run share, with its key-value cache computed once."""

    def __init__(self, model, items: Sequence[EncodedQuery], counts: TokenCount, enabled: bool = True):
        first = items[0].prompt
        n = min(len(it.prompt) for it in items) - 1  # every query keeps a prompt token for its own pass
        for it in items[1:]:
            n = next((i for i, (a, b) in enumerate(zip(first[:n], it.prompt)) if a != b), n)
        self.length, self.cache = max(n, 0) if enabled else 0, None
        if self.length:
            ids = torch.tensor([first[: self.length]], device=model.cfg.device)
            _, self.cache = forward_logits(model, ids, torch.ones_like(ids), keep=1)
            counts.computed += self.length

    def expand(self, rows: int):
        """A fresh cache with the prefix repeated ``rows`` times (the stored one stays untouched)."""
        if self.cache is None:
            return None
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache


def _pick(logits_row: torch.Tensor, top: int, constraint, state) -> int | None:
    """The greedy token at one position: the argmax, restricted to the allowed tokens when constrained."""
    if constraint is None:
        return top
    allowed = constraint.allowed(state).to(logits_row.device)
    if allowed[top]:
        return top
    if not allowed.any():
        return None
    return int(logits_row.masked_fill(~allowed, float("-inf")).argmax())


def greedy_batch(model, chunks: list[list[EncodedQuery]], shared: SharedPrefix | None, reuse: bool, pad_id: int,
                 max_new_tokens: int, stops: set[int], counts: TokenCount, constraint=None,
                 states: list | None = None) -> list[list[int]]:
    """Greedy continuations (each up to and including its first stop token), as :func:`generate_batch` gives.

    ``shared`` is None when the key-value cache cannot be trusted: then every pass recomputes the whole
    sequence. ``reuse=False`` computes every prompt whole (no prefix shared within a chunk). ``states`` are the constraint's start states, one per item.
    """
    items = [it for c in chunks for it in c]
    device, n_ctx = model.cfg.device, model_context_length(model)
    limits = [min(max_new_tokens, n_ctx - len(it.prompt) + 1) for it in items]  # the last token is never input
    fed = [min(len(it.gold), n_ctx - len(it.prompt)) for it in items]  # gold tokens teacher-forced
    states = list(states) if states is not None else [None] * len(items)

    # 1. One teacher-forced pass: prompt suffix + gold, predictions for gold positions 0..fed.
    if shared is not None:
        plen = [max(p, shared.length) if reuse else 0 for p in shared_lengths(chunks, reuse)]
        base = shared.length
        cache = shared.expand(len(chunks))
        pmask = torch.ones((len(chunks), base), dtype=torch.long, device=device)
        mids = [c[0].prompt[base:p] for c, p in zip(chunks, plen)]
        if any(mids):  # each context's description, once per chunk
            ids, mmask = pad_rows([m or [pad_id] for m in mids], pad_id, "right", device)
            mmask[[i for i, m in enumerate(mids) if not m]] = 0
            pmask = torch.cat([pmask, mmask], 1)
            if cache is None:
                _, cache = forward_logits(model, ids, pmask, keep=1)
            else:
                forward_logits(model, ids, pmask, cache, keep=1)
            counts.computed += ids.numel()
        rows_of = [ci for ci, c in enumerate(chunks) for _ in c]
        if cache is not None:
            cache.reorder_cache(torch.tensor(rows_of, device=device))
        pmask = pmask[rows_of]
        p_of = [p for c, p in zip(chunks, plen) for _ in c]
        ids, smask = pad_rows([it.prompt[p:] + it.gold[:f] for it, p, f in zip(items, p_of, fed)], pad_id, "right", device)
        mask = torch.cat([pmask, smask], 1)
        starts = [len(it.prompt) - p - 1 for it, p in zip(items, p_of)]
        keep = ids.shape[1] - min(starts)  # logits only from the first prediction of a gold token on
        if cache is None:
            logits, cache = forward_logits(model, ids, mask, keep=keep)
        else:
            logits, _ = forward_logits(model, ids, mask, cache, keep=keep)
        offset = pmask.shape[1]
    else:
        cache = None
        ids, mask = pad_rows([it.prompt + it.gold[:f] for it, f in zip(items, fed)], pad_id, "left", device)
        starts = [ids.shape[1] - f - 1 for f in fed]
        keep = ids.shape[1] - min(starts)
        logits = model(ids, attention_mask=mask, logits_to_keep=keep)
    counts.computed += ids.numel()
    shift = ids.shape[1] - keep  # column of logits[:, 0] in the row
    top = logits.argmax(-1).tolist()

    # 2. Accept the draft up to the first disagreement; the argmax there is greedy's own next token.
    out: list[list[int]] = []
    done, kept = [], []
    for i, it in enumerate(items):
        seq, state, finished = [], states[i], limits[i] <= 0
        for t in range(fed[i] + 1):
            if finished:
                break
            pos = starts[i] + t - shift
            tok = _pick(logits[i, pos], top[i][pos], constraint, state)
            if tok is None:  # nothing the constraint allows: greedy cannot continue either
                finished = True
                break
            seq.append(tok)
            state = constraint.advance(state, tok) if constraint is not None else None
            finished = (tok in stops or len(seq) >= limits[i]
                        or (constraint is not None and constraint.finished(state)))
            if t == fed[i] or tok != it.gold[t]:
                break
        out.append(seq)
        done.append(finished)
        kept.append(len(seq) - 1)  # gold tokens that stay in the context
        states[i] = state

    # 3. Decode the rest only for the queries that diverged, from the divergence on.
    active = [i for i in range(len(items)) if not done[i]]
    if not active:
        return out
    if cache is not None:
        cache.reorder_cache(torch.tensor(active, device=device))
        mask = mask[active].clone()
        for r, i in enumerate(active):  # drop the draft after the divergence (and the padding) from attention
            mask[r, offset + starts[i] + 1 + kept[i]:] = 0
    while active:
        if cache is not None:
            step = torch.tensor([[out[i][-1]] for i in active], device=device)
            mask = torch.cat([mask, torch.ones_like(step)], 1)
            logits, _ = forward_logits(model, step, mask, cache, keep=1)
            counts.computed += step.numel()
        else:
            ids, mask = pad_rows([items[i].prompt + out[i] for i in active], pad_id, "left", device)
            logits = model(ids, attention_mask=mask, logits_to_keep=1)
            counts.computed += ids.numel()
        last = logits[:, -1]
        nxt = last.argmax(-1).tolist()
        still = []
        for r, i in enumerate(active):
            tok = _pick(last[r], nxt[r], constraint, states[i])
            if tok is None:
                continue
            out[i].append(tok)
            if constraint is not None:
                states[i] = constraint.advance(states[i], tok)
            if not (tok in stops or len(out[i]) >= limits[i]
                    or (constraint is not None and constraint.finished(states[i]))):
                still.append(r)
        if len(still) < len(active) and cache is not None and still:
            keep = torch.tensor(still, device=device)
            cache.reorder_cache(keep)
            mask = mask[keep]
        active = [active[r] for r in still]
    return out


def count_per_prompt(items: Sequence[EncodedQuery], outputs: Sequence[Sequence[int]], counts: TokenCount) -> None:
    """Add what a per-prompt greedy run computes: the prompt, then each generated token but the last."""
    counts.per_prompt += sum(len(it.prompt) + max(len(o) - 1, 0) for it, o in zip(items, outputs))
