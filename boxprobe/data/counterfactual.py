"""Prakash et al.'s counterfactual pairs (``random-query``): the corrupt prompt is ANOTHER context whose
query label is one neither prompt names.

Follows ``box_index_aligner_examples`` in Nix07/finetuning ``counterfactual_datasets/entity_tracking.py``:
the source (corrupt) prompt is a randomly drawn other example whose box labels are replaced by labels
outside the clean prompt's range, and the score is the clean run's correct object at the clean answer
position. Differences, each forced by our data: contexts differ in token length here (Prakash's
template prompts all have one length), so the corrupt context is drawn among those whose prompt has
the clean prompt's length; and with seven boxes fewer than seven unused digits remain, so only the
QUERY label is replaced (by a label absent from both prompts), as in ``pairs.random-label``.

Both prompts go through the spine: the clean queries are the :class:`QuerySet` passed in, the corrupt
ones are built as :class:`~boxprobe.data.task.Example` s and tokenised by
:func:`~boxprobe.data.queries.prepare` with the same spec. Each input is the prompt plus the answer
prefix " the" (the ``answer_prefix`` k=0 role, the last input position); the correct object is the
clean query's ``answer_object`` k=0 token. The corrupt query carries the clean answer as its gold only
so that the spine locates the same answer prefix; it is never scored.

Clean queries are kept only where the box is non-empty and the model's next-token prediction at the
answer prefix is the correct object, at most ``per_context`` boxes per context, drawn evenly over the
per-box ``numops`` values (stratified).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from boxprobe.data.positions import LABEL_RE, PositionError
from boxprobe.data.queries import QuerySet, prepare
from boxprobe.data.task import ALT_BOX_NAMES, Example
from boxprobe.errors import ArgumentError, DataError

logger = logging.getLogger(__name__)


def context_key(ex: Example) -> str:
    """The identity of an example's context (state and number of operations): the clustering unit."""
    return f"{ex.sample_id}:{ex.num_operations if ex.num_operations is not None else ex.context}"


def _answer_tokens(queries: QuerySet) -> pd.DataFrame:
    """Per non-empty query: the answer prefix (k=0) index and the correct object's first token."""
    pos = queries.positions
    pre = pos[(pos["role"] == "answer_prefix") & (pos["k"] == 0)].set_index("item")["token_index"]
    obj = pos[(pos["role"] == "answer_object") & (pos["k"] == 0)].set_index("item")["token_index"]
    items = sorted(set(pre.index) & set(obj.index))
    return pd.DataFrame({"item": items, "prefix": [int(pre[i]) for i in items],
                         "answer": [queries.items[i].ids[int(obj[i])] for i in items]})


def next_tokens(model, sequences: Sequence[Sequence[int]], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Argmax next token and its probability distribution's top id after each sequence (left-padded batches).

    Returns (argmax ids, log-probabilities of the argmax) per sequence."""
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    top, logp = [], []
    with torch.inference_mode():
        for s in range(0, len(sequences), batch_size):
            chunk = sequences[s:s + batch_size]
            width = max(len(c) for c in chunk)
            toks = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(toks)
            for i, c in enumerate(chunk):
                toks[i, width - len(c):], mask[i, width - len(c):] = torch.tensor(list(c)), 1
            logits = model(toks.to(model.cfg.device), attention_mask=mask.to(model.cfg.device))[:, -1].float()
            lp = logits.log_softmax(-1)
            best = lp.argmax(-1)
            top.append(best.cpu())
            logp.append(lp.gather(1, best[:, None])[:, 0].cpu())
    return torch.cat(top).numpy(), torch.cat(logp).numpy()


def correct_answers(model, queries: QuerySet, batch_size: int = 32, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Non-empty queries (or the rows of ``table``, from ``_answer_tokens``) with the answer prefix, the
    correct object and whether the model predicts it there.

    Columns: item, prefix, answer, predicted, correct, numops, context."""
    table = _answer_tokens(queries) if table is None else table
    inputs = [queries.items[i].ids[:p + 1] for i, p in zip(table["item"], table["prefix"])]
    predicted, _ = next_tokens(model, inputs, batch_size) if inputs else (np.zeros(0, int), None)
    exs = [queries.items[i].query.examples[0] for i in table["item"]]
    return table.assign(predicted=predicted, correct=predicted == table["answer"].to_numpy(),
                        numops=[e.numops for e in exs], context=[context_key(e) for e in exs])


def stratified(table: pd.DataFrame, n: int | None, per_context: int, rng: np.random.Generator) -> pd.DataFrame:
    """At most ``per_context`` rows per context, then up to ``n`` rows drawn evenly over numops (round robin)."""
    table = table.iloc[rng.permutation(len(table))]
    table = table.groupby("context", sort=False).head(per_context)
    strata = {k: list(g.index) for k, g in table.groupby("numops")}
    order = []
    while any(strata.values()) and (n is None or len(order) < n):
        for k in sorted(strata):
            if strata[k] and (n is None or len(order) < n):
                order.append(strata[k].pop(0))
    return table.loc[order]


def _relabel(ex: Example, style: str, new: int, contents: Sequence[str]) -> Example:
    """``ex``'s context with its query label replaced by ``new`` (which it never names)."""
    label = f"Box {new}" if style == "Box" else f"Container {ALT_BOX_NAMES[new]}"
    seq2seq = not ex.statement_prefix.endswith("contains")
    statement = label if seq2seq else f"{label} contains"
    answer = " and ".join(f"the {o}" for o in contents)
    answer = f"contains {answer}" if seq2seq else answer
    masked = f"{ex.context} {statement} <extra_id_0> ."
    return Example(sentence=masked.replace("<extra_id_0> .", f"{answer}."), sentence_masked=masked,
                   masked_content=f"<extra_id_0> {answer}", sample_id=ex.sample_id, numops=0,
                   num_operations=ex.num_operations, box=new)


def _label_text(style: str, box: int) -> str:
    return f"Box {box}" if style == "Box" else f"Container {ALT_BOX_NAMES[box]}"


def _style(ex: Example) -> str:
    m = LABEL_RE.search(ex.statement_prefix)
    if m is None:
        raise PositionError(f"sample_id {ex.sample_id}: statement {ex.statement_prefix!r} names no box.")
    return "Box" if m.group(1) is not None else "Container"


def corrupt_candidates(model, pool: Sequence[Example], spec, rng: np.random.Generator) -> tuple[QuerySet, dict]:
    """One corrupt query per context of ``pool`` (queried at a label its prompt never names), prepared
    through the spine, and the candidates' indices by input length (prompt + answer prefix)."""
    seen, exs = set(), []
    for e in pool:
        if context_key(e) in seen:
            continue
        seen.add(context_key(e))
        style = _style(e)
        limit = len(ALT_BOX_NAMES) if style == "Container" else 10
        demos = " ".join(d for d in getattr(spec.template, "demonstrations", ()) if isinstance(d, str))
        text = e.context + " " + demos
        unused = [b for b in range(limit) if not re.search(rf"\b{_label_text(style, b)}\b", text)]
        objects = re.findall(r"the (\w+)", e.context)
        if unused and objects:  # any object of the context: its gold only places the answer prefix
            exs.append(_relabel(e, style, int(rng.choice(unused)), objects[:1]))
    if not exs:
        raise DataError("No context of the pool can be queried at an unused label.")
    queries = prepare(model, exs, spec)
    table = _answer_tokens(queries)
    buckets = defaultdict(list)
    for item, prefix in zip(table["item"], table["prefix"]):
        buckets[int(prefix) + 1].append(int(item))
    return queries, buckets


def build_random_query_pairs(model, queries: QuerySet, *, seed: int = 0, limit: int | None = 100,
                             per_context: int = 1, correct_only: bool = True, pool: Sequence[Example] | None = None,
                             max_tries: int = 20, batch_size: int = 32, wrong_only: bool = False):
    """Prakash-style pairs (module docstring): returns (pairs, PairStats) as :func:`pairs.build_pairs`.

    ``wrong_only`` (with ``correct_only=False``) keeps instead the boxes the model answers WRONGLY, checking
    every non-empty box of a context rather than a few (for CMAP, which repairs the recipient's errors)."""
    from boxprobe.data.pairs import Pair, PairStats  # pairs imports this module lazily

    if wrong_only and correct_only:
        raise ArgumentError("wrong_only keeps the pairs the model gets wrong; pass correct_only=False with it.")

    rng = np.random.default_rng(seed)
    stats = PairStats("random-query")
    candidates = _answer_tokens(queries)
    stats.n_examples = len(queries)
    stats.rejected["empty"] = len(queries) - len(candidates)
    # Only a few boxes per context can be kept, so only a few are checked (one forward each).
    ctx = [context_key(queries.items[i].query.examples[0]) for i in candidates["item"]]
    candidates = candidates.assign(context=ctx).iloc[rng.permutation(len(candidates))]
    checked = candidates.groupby("context", sort=False).head(len(candidates) if wrong_only else 3 * per_context)
    checked = checked.drop(columns="context").sort_values("item")
    stats.rejected["not_checked"] = len(candidates) - len(checked)
    answers = correct_answers(model, queries, batch_size, checked)
    if correct_only:
        stats.rejected["wrong"] = int((~answers["correct"]).sum())
        answers = answers[answers["correct"]]
    if wrong_only:
        stats.rejected["correct"] = int(answers["correct"].sum())
        answers = answers[~answers["correct"]]
    chosen = stratified(answers, None, per_context, rng)
    pool = list(pool) if pool is not None else [it.query.examples[0] for it in queries.items]
    corrupt, buckets = corrupt_candidates(model, pool, queries.spec, rng)
    matched = []
    for row in chosen.itertuples():
        item = queries.items[row.item]
        ids_c = item.ids[:row.prefix + 1]
        hit = None
        options = buckets.get(len(ids_c), [])
        for j in rng.permutation(len(options))[:max_tries] if options else []:
            cq = corrupt.items[options[int(j)]]
            label = re.search(r"(Box \w+|Container \w+)\s*(contains)?$", cq.query.prompt.rstrip())
            if (context_key(cq.query.examples[0]) == row.context
                    or (label and re.search(rf"\b{label.group(1)}\b", item.query.prompt))):
                continue
            hit = (options[int(j)], cq.ids[:len(ids_c)])
            break
        if hit is None:
            stats.rejected["length"] += 1
            continue
        matched.append((row, *hit))
        if limit is not None and len(matched) >= limit * 2:
            break
    if not matched:
        raise DataError("No random-query pair could be built: no other context gives a prompt of the clean prompt's "
                        "token length. Use more examples (several contexts per numops).")
    # The corrupt run's own top token is the second answer of the logit-difference variant.
    corrupt_top, _ = next_tokens(model, [ids for _, _, ids in matched], batch_size)
    pairs = []
    for (row, j, ids_k), top in zip(matched, corrupt_top):
        item = queries.items[row.item]
        if int(top) == int(row.answer):
            stats.rejected["same_answer"] += 1
            continue
        ids_c = tuple(item.ids[:row.prefix + 1])
        table = queries.positions[queries.positions["item"] == row.item].drop(columns="item").reset_index(drop=True)
        ktable = corrupt.positions[corrupt.positions["item"] == j].drop(columns="item").reset_index(drop=True)
        answer = item.query.continuation
        pairs.append(Pair("random-query", item.query, corrupt.items[j].query, ids_c, tuple(ids_k), int(row.answer),
                          int(top), answer, model.tokenizer.decode([int(top)]), " the", table, ktable))
    # Re-stratify the kept pairs so that rejections do not skew the numops mix.
    kept = pd.DataFrame({"numops": [p.clean.examples[0].numops for p in pairs],
                         "context": [context_key(p.clean.examples[0]) for p in pairs]})
    order = stratified(kept, limit, per_context, rng).index
    pairs = [pairs[i] for i in order]
    stats.n_pairs = len(pairs)
    logger.info("random-query pairs: %d kept of %d queries; rejected %s", stats.n_pairs, stats.n_examples,
                {k: v for k, v in stats.rejected.items() if v})
    return pairs, stats
