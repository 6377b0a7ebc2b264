"""Counterfactual prompt pairs for activation patching, and their collation into padded batches.

A pair is a clean and a corrupt per-box prompt of EQUAL token length (per the tokenizer) that differ in
one thing, named by the desideratum it isolates:

``query-box``     same description, another box queried (one whose answer differs at the answer token).
``object-value``  the queried box's objects replaced, everywhere they are mentioned, by objects the prompt
                  never names (equal token counts; lists of objects stay alphabetical where possible).
``positional``    the initial-state clauses reordered (each label keeps its contents), same query, so the
                  true answer A is the same in both. The corrupt answer token is that of C, the box whose
                  clause now sits where the queried box's clause was: what a lookup by position alone
                  would answer. Both runs prefer A; the corrupt run less so when the model is drawn to
                  the position. A denoising patch that carries the clean run's position information makes
                  the corrupt run lean to C: the logit difference falls (the normalised metric goes below
                  0). ``logit_diff`` reads this most directly; the metric tokens suit denoising only.
``random-label``  the queried label replaced by one the prompt never names (``Box 9`` with 7 boxes) and
                  the tokenizer knows; the corrupt answer is ``nothing`` (an unmentioned box holds nothing).
``random-query``  the default, Prakash et al.'s pairs (:mod:`boxprobe.data.counterfactual`): the corrupt
                  prompt is another context queried at an unused label, both end in the answer prefix
                  " the", and the clean run's correct object is scored there. Only non-empty boxes the
                  model answers correctly, stratified by numops, one per context by default.

The first four kinds are the earlier, named variants; they compare answers as follows.

Answer tokens. The two answers are compared on their FIRST DIFFERING TOKEN. The longest run of whole
words both continuations start with (``" the"`` for ``" the apple."`` vs ``" the ball."``, nothing for
``" nothing."`` vs ``" the ball."``) is appended to both prompts as input, and ``clean_token`` /
``corrupt_token`` are the next token of each continuation: the first token of the first object (after
"the"), or of ``nothing``. Pairs whose answers agree on that token (``" the apple and"`` vs ``" the
apple."``) are rejected as ``same_answer``. Pairs whose prompts differ in length are rejected as
``length`` (counted in ``PairStats`` and logged as a warning), never kept.

``collate_pairs`` left-pads pairs into a ``PairBatch``; the metrics here (``logit_diff``,
``normalised_logit_diff``, ``answer_accuracy``) read its answer tokens at the last position.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from boxprobe.config import ConfigError, check_choice
from boxprobe.data.labels import states_from_context
from boxprobe.data.positions import (LABEL_RE, PositionError, encode_with_offsets, frame_rows, label_box,
                                     parse_description, prompt_role_rows)
from boxprobe.data.prompts import Query, build_query
from boxprobe.data.queries import PromptSpec, QuerySet
from boxprobe.data.task import ALT_BOX_NAMES, MASK, Example, load_vocabulary, render_objects
from boxprobe.errors import ArgumentError, DataError

logger = logging.getLogger(__name__)

PAIR_KINDS = ("random-query", "query-box", "object-value", "positional", "random-label")
DEFAULT_KIND = "random-query"
REJECT_REASONS = ("length", "same_answer", "tokenization", "no_candidate", "unparsable", "empty", "wrong")
POSITION_SPECS = ("answer_prefix", "query_last", "query_box", "box_mention", "state_end", "object_first",
                  "object_last")


@dataclass(frozen=True, eq=False)
class Pair:
    """A clean/corrupt prompt pair; ``*_ids`` are the model inputs (BOS included, answer prefix appended)."""

    kind: str
    clean: Query
    """The clean query; ``prompt`` ends with the shared answer prefix (e.g. ``" the"``)."""
    corrupt: Query
    clean_ids: tuple[int, ...]
    corrupt_ids: tuple[int, ...]
    clean_token: int
    """First differing answer token of the clean answer."""
    corrupt_token: int
    clean_answer: str
    """The clean answer continuation the token comes from, e.g. ``" the apple."``."""
    corrupt_answer: str
    answer_prefix: str
    """Text appended to both prompts: the words both answers start with (``" the"`` or ``""``)."""
    clean_positions: pd.DataFrame = field(repr=False)
    """``positions.position_table`` of ``clean.prompt`` (indices into ``clean_ids``)."""
    corrupt_positions: pd.DataFrame = field(repr=False)


@dataclass
class PairStats:
    """How many examples gave a pair, and why the others did not."""

    kind: str
    n_examples: int = 0
    n_pairs: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))


# -- text surgery ------------------------------------------------------------------------------------


def _label_style(ex: Example) -> tuple[str, int]:
    m = LABEL_RE.search(ex.statement_prefix)
    if m is None:
        raise PositionError(f"sample_id {ex.sample_id}: statement {ex.statement_prefix!r} names no box.")
    return ("Box" if m.group(1) is not None else "Container"), label_box(m)


def _label(style: str, box: int) -> str:
    return f"Box {box}" if style == "Box" else f"Container {ALT_BOX_NAMES[box]}"


def _answer_text(contents: Sequence[str], seq2seq: bool) -> str:
    if not seq2seq:
        return render_objects(contents)
    return f"contains {render_objects(contents)}" if contents else "is empty"


def _example(ex: Example, context: str, label: str, box: int, contents: Sequence[str], numops: int) -> Example:
    """``ex`` with another context and/or queried label, in ``ex``'s statement format."""
    seq2seq = not ex.statement_prefix.endswith("contains")
    statement = label if seq2seq else f"{label} contains"
    masked = f"{context} {statement} {MASK} ."
    answer = _answer_text(contents, seq2seq)
    return Example(sentence=masked.replace(f"{MASK} .", f"{answer}."), sentence_masked=masked,
                   masked_content=f"{MASK} {answer}", sample_id=ex.sample_id, numops=numops,
                   num_operations=ex.num_operations, box=box)


def _numops(context: str, box: int) -> int:
    return len({m.op_index for m in parse_description(context) if m.kind == "box" and m.box == box and m.op_index >= 0})


def _shared_words(a: str, b: str) -> str:
    """The whole words (each with its leading space) that both continuations start with."""
    wa, wb = re.findall(r"\s*\S+", a), re.findall(r"\s*\S+", b)
    out = []
    for x, y in zip(wa, wb):
        if x != y:
            break
        out.append(x)
    return "".join(out)


def _lists_sorted(context: str) -> bool:
    return all(sorted(g) == g for g in (re.findall(r"the (\w+)", m.group()) for m in
                                        re.finditer(r"the \w+(?: and the \w+)+", context)))


# -- building -----------------------------------------------------------------------------------------


class _Builder:
    # Tokenises and locates roles exactly as boxprobe.data.queries.prepare does, with the same spec.
    def __init__(self, tokenizer, spec: PromptSpec):
        self.tokenizer, self.spec = tokenizer, spec
        self.unk = getattr(tokenizer, "unk_token_id", None)

    def query(self, ex: Example) -> Query:
        return build_query([ex], self.spec.template, "per-box", self.tokenizer, self.spec.chat)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [ids for ids, _, _ in encode_with_offsets(self.tokenizer, texts, add_special_tokens=not self.spec.chat)]

    def table(self, query: Query) -> pd.DataFrame:
        (_, offsets, special), = encode_with_offsets(self.tokenizer, [query.prompt],
                                                     add_special_tokens=not self.spec.chat)
        return frame_rows(prompt_role_rows(query, offsets, special))

    def finish(self, kind: str, clean_ex: Example, corrupt_ex: Example, corrupt_answer: str | None = None):
        """A Pair, or the reason (a REJECT_REASONS entry) there is none."""
        cq, kq = self.query(clean_ex), self.query(corrupt_ex)
        c_cont, k_cont = cq.continuation, corrupt_answer if corrupt_answer is not None else kq.continuation
        shared = _shared_words(c_cont, k_cont)
        if shared in (c_cont, k_cont):
            return "same_answer"  # one answer is a prefix of the other: no token tells them apart
        ids_c, ids_k, full_c, full_k = self.encode([cq.prompt + shared, kq.prompt + shared,
                                                    cq.prompt + c_cont, kq.prompt + k_cont])
        if (full_c[: len(ids_c)] != ids_c or full_k[: len(ids_k)] != ids_k
                or len(full_c) <= len(ids_c) or len(full_k) <= len(ids_k)):
            return "tokenization"
        if self.unk is not None and self.unk in ids_k + full_k[len(ids_k):len(ids_k) + 1] and self.unk not in ids_c:
            return "tokenization"  # the tokenizer does not know a word the corrupt prompt introduces
        tc, tk = full_c[len(ids_c)], full_k[len(ids_k)]
        if tc == tk:
            return "same_answer"
        if len(ids_c) != len(ids_k):
            return "length"
        cq = replace(cq, prompt=cq.prompt + shared, continuation=c_cont[len(shared):])
        kq = replace(kq, prompt=kq.prompt + shared, continuation=kq.continuation[len(shared):])
        return Pair(kind, cq, kq, tuple(ids_c), tuple(ids_k), tc, tk, c_cont, k_cont, shared,
                    self.table(cq), self.table(kq))


def _candidates(kind: str, ex: Example, prompt: str, rng: np.random.Generator,
                max_tries: int) -> Iterator[tuple[Example, str | None]]:
    """(corrupt example, corrupt answer continuation or None for its own) in the order to try them.

    ``prompt`` is the whole clean prompt (demonstrations included): new labels and objects avoid its words."""

    context, (style, box) = ex.context, _label_style(ex)
    final = states_from_context(context)[-1]
    seq2seq = not ex.statement_prefix.endswith("contains")
    if kind == "query-box":
        for other in rng.permutation(len(final)):
            if int(other) != box:
                yield _example(ex, context, _label(style, int(other)), int(other), final[other],
                               _numops(context, int(other))), None
    elif kind == "random-label":
        limit = len(ALT_BOX_NAMES) if style == "Container" else len(final) + 10
        unused = [b for b in range(len(final), limit) if not re.search(rf"\b{_label(style, b)}\b", prompt)]
        for b in rng.permutation(unused) if unused else []:
            yield _example(ex, context, _label(style, int(b)), int(b), (), 0), None
    elif kind == "object-value":
        contents = final[box]
        vocab = next((v for v in (load_vocabulary("objects"), load_vocabulary("objects_rare"))
                      if set(contents) <= set(v)), load_vocabulary("objects"))
        named = set(re.findall(r"\w+", prompt))
        pool = [o for o in vocab if o not in named]
        for _ in range(max_tries if contents and len(pool) >= len(contents) else 0):
            new = sorted(rng.choice(pool, size=len(contents), replace=False).tolist())
            mapping = dict(zip(contents, new))  # sorted onto sorted keeps their relative order
            swapped = re.sub(r"\bthe (\w+)\b", lambda m: f"the {mapping.get(m.group(1), m.group(1))}", context)
            if _lists_sorted(swapped) or not _lists_sorted(context):
                yield _example(ex, swapped, _label(style, box), box, new, ex.numops), None
    elif kind == "positional":
        end = context.index(".")
        clauses = context[:end].split(", ")
        boxes = [label_box(LABEL_RE.search(c)) for c in clauses]
        here = boxes.index(box)
        for _ in range(max_tries if len(clauses) > 1 else 0):
            order = rng.permutation(len(clauses))
            if boxes[order[here]] == box:
                continue
            swapped = ", ".join(clauses[i] for i in order) + context[end:]
            there = boxes[order[here]]  # the box whose description now sits at the answer's old place
            yield (_example(ex, swapped, _label(style, box), box, final[box], ex.numops),
                   f" {_answer_text(final[there], seq2seq)}.")
    else:
        check_choice("pair kind", kind, PAIR_KINDS)


def build_pairs(model, queries: QuerySet, kind: str = DEFAULT_KIND, *, seed: int = 0, limit: int | None = None,
                max_tries: int = 20, **random_query) -> tuple[list[Pair], PairStats]:
    """Equal-length clean/corrupt pairs of ``kind`` (see the module docstring) from a per-box query set.

    The clean examples are those of ``queries`` (:func:`boxprobe.data.queries.prepare`); clean and
    corrupt prompts are rendered with its spec and tokenised as ``prepare`` does. Candidates (other
    boxes, labels, objects, clause orders) are tried in a seeded random order; the first that gives an
    equal-length pair with different answer tokens is kept. ``limit`` stops after that many pairs.
    ``random_query``: per_context, correct_only, wrong_only, pool, batch_size of
    :func:`boxprobe.data.counterfactual.build_random_query_pairs` (random-query pairs only).
    """
    check_choice("pair kind", kind, PAIR_KINDS)
    if not isinstance(queries, QuerySet):
        raise ConfigError("build_pairs takes a query set: queries = boxprobe.prepare(model, examples, spec).")
    queries.check_model(model)
    if queries.spec.format != "per-box":
        raise ConfigError("Pairs are built from per-box queries; prepare them with format='per-box'.")
    if kind == "random-query":
        from boxprobe.data.counterfactual import build_random_query_pairs

        return build_random_query_pairs(model, queries, seed=seed, limit=limit, max_tries=max_tries, **random_query)
    if random_query:
        raise ArgumentError(f"{sorted(random_query)} apply to random-query pairs only, not to {kind!r}.")
    builder, rng = _Builder(model.tokenizer, queries.spec), np.random.default_rng(seed)
    stats, pairs = PairStats(kind), []
    for ex in queries.examples:
        if limit is not None and len(pairs) >= limit:
            break
        stats.n_examples += 1
        reasons = []
        try:
            prompt = builder.query(ex).prompt
            for corrupt, answer in _candidates(kind, ex, prompt, rng, max_tries):
                result = builder.finish(kind, ex, corrupt, answer)
                if isinstance(result, Pair):
                    pairs.append(result)
                    break
                reasons.append(result)
            else:
                # Report the most specific failure: a length mismatch outranks the rest.
                reason = next((r for r in REJECT_REASONS if r in reasons), "no_candidate")
                stats.rejected[reason] += 1
        except PositionError as err:
            logger.debug("sample_id %s not parsed: %s", ex.sample_id, err)
            stats.rejected["unparsable"] += 1
    stats.n_pairs = len(pairs)
    if stats.rejected["length"]:
        logger.warning("%s pairs: %d of %d examples rejected because clean and corrupt prompts tokenize to "
                       "different lengths", kind, stats.rejected["length"], stats.n_examples)
    if stats.n_pairs < stats.n_examples:
        logger.info("%s pairs: %d of %d examples kept; rejected %s", kind, stats.n_pairs, stats.n_examples,
                    {k: v for k, v in stats.rejected.items() if v})
    return pairs, stats


# -- batches ------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """Left-padded clean and corrupt token batches of some pairs (both padded alike, one shared mask)."""

    pairs: list[Pair]
    clean_tokens: Int[torch.Tensor, "batch pos"]
    corrupt_tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"] | None
    """None when every pair has the same length (no padding)."""
    clean_answer: Int[torch.Tensor, "batch"]
    corrupt_answer: Int[torch.Tensor, "batch"]
    pad: Int[torch.Tensor, "batch"]
    """Left padding of each row."""
    clean_logit_diff: torch.Tensor | None = None
    """Per-pair logit difference of the unpatched clean run (set by ``patching.with_baselines``)."""
    corrupt_logit_diff: torch.Tensor | None = None
    clean_prob: torch.Tensor | None = None
    """Per-pair probability of the clean answer token in the unpatched clean run."""

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def contexts(self) -> list[str]:
        """Each pair's clean context (sample_id:num_operations): the unit intervals are clustered by."""
        from boxprobe.data.counterfactual import context_key

        return [context_key(p.clean.examples[0]) for p in self.pairs]

    @property
    def n_pos(self) -> int:
        return int(self.clean_tokens.shape[1])

    def positions(self, spec: str | int) -> Int[torch.Tensor, "batch"]:
        """Padded index of a position in every row: an int (negative counts from the end) or a role of the
        CLEAN prompt: query_last, query_box, box_mention (the queried box's initial-state label), state_end,
        object_first / object_last (the first mention of the clean answer's first object)."""
        device = self.clean_tokens.device
        if isinstance(spec, (int, np.integer)):
            index = int(spec) + self.n_pos if spec < 0 else int(spec)
            if not 0 <= index < self.n_pos:
                raise ArgumentError(f"position {spec} is outside the batch's {self.n_pos} positions.")
            return torch.full((len(self),), index, dtype=torch.long, device=device)
        check_choice("position", spec, POSITION_SPECS)
        out = []
        for pair, pad in zip(self.pairs, self.pad.tolist()):
            t = pair.clean_positions
            box = int(t.loc[t["role"] == "query_box", "box"].iloc[0])
            if spec in ("query_last", "query_box", "state_end"):
                rows = t[t["role"] == spec]
            elif spec == "answer_prefix":
                rows = t[(t["role"] == spec) & (t["k"] == 0)] if "k" in t else t.iloc[:0]
            elif spec == "box_mention":
                rows = t[(t["role"] == spec) & (t["box"] == box) & (t["mention"] == "initial")]
            else:
                first = re.findall(r"the (\w+)", pair.clean_answer)
                rows = t[(t["role"] == spec) & (t["object"] == first[0])] if first else t.iloc[:0]
            if rows.empty:
                raise PositionError(f"pair of sample_id {pair.clean.examples[0].sample_id} has no {spec!r} "
                                    f"position (answer {pair.clean_answer!r}); choose another position.")
            out.append(int(rows["token_index"].min()) + pad)
        return torch.tensor(out, dtype=torch.long, device=device)

    def to(self, device: str | torch.device) -> "PairBatch":
        """The batch with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch(self.pairs, *(move(getattr(self, f)) for f in (
            "clean_tokens", "corrupt_tokens", "attention_mask", "clean_answer", "corrupt_answer", "pad",
            "clean_logit_diff", "corrupt_logit_diff", "clean_prob")))

    def select(self, index: Sequence[int]) -> "PairBatch":
        """The rows ``index`` (a sub-batch; padding columns are kept)."""
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.clean_tokens.device)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return PairBatch([self.pairs[i] for i in index], self.clean_tokens[idx], self.corrupt_tokens[idx],
                         pick(self.attention_mask), self.clean_answer[idx], self.corrupt_answer[idx], self.pad[idx],
                         pick(self.clean_logit_diff), pick(self.corrupt_logit_diff), pick(self.clean_prob))


def collate_pairs(pairs: Sequence[Pair], pad_id: int, device: str | torch.device = "cpu") -> PairBatch:
    """Left-pad the pairs' clean and corrupt ids to the longest pair; the mask is None without padding."""
    if not pairs:
        raise DataError("No pairs to collate; build_pairs kept none (see its PairStats).")
    width = max(len(p.clean_ids) for p in pairs)
    clean = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    corrupt, mask = clean.clone(), torch.zeros_like(clean)
    for i, p in enumerate(pairs):
        n = len(p.clean_ids)
        clean[i, width - n:], corrupt[i, width - n:], mask[i, width - n:] = (
            torch.tensor(p.clean_ids), torch.tensor(p.corrupt_ids), 1)
    pad = width - mask.sum(1)
    answers = [torch.tensor([getattr(p, f) for p in pairs], device=device) for f in ("clean_token", "corrupt_token")]
    return PairBatch(list(pairs), clean.to(device), corrupt.to(device), mask.to(device) if pad.any() else None,
                     *answers, pad.to(device))


# -- metrics ----------------------------------------------------------------------------------------


def logit_diff(logits: Float[torch.Tensor, "batch pos d_vocab"], batch: PairBatch) -> Float[torch.Tensor, "batch"]:
    """Last-position logit of the clean answer token minus that of the corrupt answer token."""
    last = logits[:, -1].float()
    return (last.gather(1, batch.clean_answer[:, None]) - last.gather(1, batch.corrupt_answer[:, None]))[:, 0]


def normalised_logit_diff(logits: Float[torch.Tensor, "batch pos d_vocab"],
                          batch: PairBatch) -> Float[torch.Tensor, "batch"]:
    """``logit_diff`` rescaled so the batch mean is 0 at the corrupt run and 1 at the clean run.

    Uses the batch means of the unpatched runs (``with_baselines``), so no pair divides by a near-zero
    difference of its own."""
    if batch.clean_logit_diff is None or batch.corrupt_logit_diff is None:
        raise ArgumentError("normalised_logit_diff needs the unpatched baselines; pass the batch through "
                         "with_baselines(model, batch) first (the patching functions do).")
    clean, corrupt = batch.clean_logit_diff.mean(), batch.corrupt_logit_diff.mean()
    return (logit_diff(logits, batch) - corrupt) / (clean - corrupt)


def answer_accuracy(logits: Float[torch.Tensor, "batch pos d_vocab"], batch: PairBatch) -> Float[torch.Tensor, "batch"]:
    """1 where the last position's argmax is the clean answer token (the first differing answer token)."""
    return (logits[:, -1].argmax(-1) == batch.clean_answer).float()


def prob_change(logits: Float[torch.Tensor, "batch pos d_vocab"], batch: PairBatch) -> Float[torch.Tensor, "batch"]:
    """Prakash et al.'s metric: (p_patched - p_clean) / p_clean of the clean answer token at the last position.

    0 at the clean run; -1 when patching removes all of the correct object's probability. Follows
    ``get_caches`` / ``patching_heads`` in Nix07/finetuning ``path_patching/pp_utils.py`` (softmax
    probability of the correct object, relative to the clean run)."""
    if batch.clean_prob is None:
        raise ArgumentError("prob_change needs the unpatched clean probabilities; pass the batch through "
                            "with_baselines(model, batch) first (the patching functions do).")
    p = logits[:, -1].float().softmax(-1).gather(1, batch.clean_answer[:, None])[:, 0]
    return (p - batch.clean_prob) / batch.clean_prob


Metric = Callable[[Float[torch.Tensor, "batch pos d_vocab"], PairBatch], torch.Tensor]


def attach_baselines(batch: PairBatch, clean_logits: Float[torch.Tensor, "batch pos d_vocab"],
                     corrupt_logits: Float[torch.Tensor, "batch pos d_vocab"]) -> PairBatch:
    """``batch`` with the logit differences of unpatched clean and corrupt runs attached."""
    clean, corrupt = logit_diff(clean_logits, batch), logit_diff(corrupt_logits, batch)
    if torch.isclose(clean.mean(), corrupt.mean()):
        logger.warning("clean and corrupt runs have the same mean logit difference (%.4g), so normalised_logit_diff "
                       "is undefined; use logit_diff (as for positional pairs).", float(clean.mean()))
    prob = clean_logits[:, -1].float().softmax(-1).gather(1, batch.clean_answer[:, None])[:, 0]
    return replace(batch, clean_logit_diff=clean, corrupt_logit_diff=corrupt, clean_prob=prob)


def with_baselines(model, batch: PairBatch) -> PairBatch:
    """``batch`` on ``model``'s device with the model's unpatched clean and corrupt logit differences."""
    batch = batch.to(model.cfg.device)
    with torch.inference_mode():
        return attach_baselines(batch, model(batch.clean_tokens, attention_mask=batch.attention_mask),
                                model(batch.corrupt_tokens, attention_mask=batch.attention_mask))
