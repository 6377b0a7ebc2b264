"""Greedy decoding's own answers at the cost of about one teacher-forced pass: speculative decoding
with the gold answer as the draft, over a key-value cache shared at three levels.

Greedy decoding is a function of the prefix: as long as its argmax equals the gold token it has
produced the gold so far, so one pass that teacher-forces the gold shows every position where greedy
would follow the gold, the first position where it would not, and (the argmax there) the token it
writes instead. Only queries that diverge before their first stop token are decoded further, from the
divergence on, reusing that pass's cache: the gold tokens after the divergence are masked out of the
attention (TransformerBridge derives position ids from the mask, so the next token gets the position
right after the kept prefix) rather than cropped, because each row of a batch diverges elsewhere.
After the divergence, each step verifies a prompt-lookup draft (:func:`lookup_draft`: what followed
the latest earlier occurrence of the last tokens), so an answer that copies its context costs a few
forward passes instead of one per token. The result is token for token what
:func:`boxprobe.behaviour.decoding.generate_batch` returns, up to floating-point differences between
padded layouts when two logits tie.

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
from typing import Any, Sequence

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
                 states: list | None = None, draft_tokens: int = 4) -> list[list[int]]:
    """Greedy continuations (each up to and including its first stop token), as :func:`generate_batch` gives.

    ``shared`` is None when the key-value cache cannot be trusted: then every pass recomputes the whole
    sequence. ``reuse=False`` computes every prompt whole (no prefix shared within a chunk). ``states``
    are the constraint's start states, one per item. After a query leaves the gold, each step verifies
    up to ``draft_tokens`` tokens drafted by :func:`lookup_draft` (0: one token per step).
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
        seq, finished = [], True
        if limits[i] > 0:
            pos = starts[i] - shift
            seq, states[i], finished = _accept(logits[i, pos:pos + fed[i] + 1], top[i][pos:pos + fed[i] + 1],
                                               it.gold[:fed[i]], states[i], constraint, stops, limits[i])
        out.append(seq)
        done.append(finished)
        kept.append(len(seq) - 1)  # gold tokens that stay in the context

    # 3. Decode the rest only for the queries that diverged, from the divergence on, verifying a
    # prompt-lookup draft at each step (several tokens per forward where the model copies its context).
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
            drafts = [lookup_draft(items[i].prompt + out[i], min(draft_tokens, limits[i] - len(out[i]) - 1))
                      for i in active]
            step, smask = pad_rows([[out[i][-1]] + d for i, d in zip(active, drafts)], pad_id, "right", device)
            mask = torch.cat([mask, smask], 1)
            logits, _ = forward_logits(model, step, mask, cache, keep=step.shape[1])
            counts.computed += step.numel()
        else:
            drafts = [[] for _ in active]
            ids, mask = pad_rows([items[i].prompt + out[i] for i in active], pad_id, "left", device)
            logits = model(ids, attention_mask=mask, logits_to_keep=1)
            counts.computed += ids.numel()
        top = logits.argmax(-1).tolist()
        still = []
        for r, i in enumerate(active):
            new, states[i], finished = _accept(logits[r], top[r], drafts[r], states[i], constraint, stops,
                                               limits[i] - len(out[i]))
            out[i] += new
            if cache is not None:  # the rejected part of the draft leaves the attention
                mask[r, mask.shape[1] - step.shape[1] + len(new):] = 0
            if not finished:
                still.append(r)
        if len(still) < len(active) and cache is not None and still:
            keep = torch.tensor(still, device=device)
            cache.reorder_cache(keep)
            mask = mask[keep]
        active = [active[r] for r in still]
    return out


def _accept(logits: torch.Tensor, top: list[int], draft: list[int], state, constraint, stops: set[int],
            budget: int) -> tuple[list[int], Any, bool]:
    """Greedy's tokens from one verified draft: row t of ``logits`` predicts the token after draft[:t].

    Returns the tokens greedy writes (the accepted draft, then its own token where it first disagrees),
    the constraint state after them, and whether decoding has finished.
    """
    new: list[int] = []
    for t in range(len(draft) + 1):
        tok = _pick(logits[t], top[t], constraint, state)
        if tok is None:  # nothing the constraint allows: greedy cannot continue either
            return new, state, True
        new.append(tok)
        if constraint is not None:
            state = constraint.advance(state, tok)
        if tok in stops or len(new) >= budget or (constraint is not None and constraint.finished(state)):
            return new, state, True
        if t == len(draft) or tok != draft[t]:
            break
    return new, state, False


def lookup_draft(seq: Sequence[int], n: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup draft: the ``n`` tokens that followed the latest earlier occurrence of ``seq``'s last
    ``max_ngram`` (else fewer) tokens.

    The idea of transformers' ``PromptLookupCandidateGenerator`` (``generation/candidate_generator.py``),
    which takes the *first* occurrence of the last 2 tokens; the latest occurrence of up to 3 suits
    answers that copy the description just before them. Only the speed depends on the draft: the
    verification keeps exactly greedy's tokens.
    """
    if n <= 0:
        return []
    for size in range(min(max_ngram, len(seq) - 1), 0, -1):
        tail = list(seq[-size:])
        for start in range(len(seq) - size - 1, -1, -1):
            if list(seq[start:start + size]) == tail:
                return list(seq[start + size:start + size + n])
    return []


def count_per_prompt(items: Sequence[EncodedQuery], outputs: Sequence[Sequence[int]], counts: TokenCount) -> None:
    """Add what a per-prompt greedy run computes: the prompt, then each generated token but the last."""
    counts.per_prompt += sum(len(it.prompt) + max(len(o) - 1, 0) for it, o in zip(items, outputs))
