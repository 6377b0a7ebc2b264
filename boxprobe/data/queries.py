"""The spine of every analysis: a prompt spec resolved once, and queries tokenised once.

>>> spec = resolve_spec(model)                       # arguments, then the checkpoint's boxprobe.json, then defaults
>>> queries = prepare(model, examples, spec)         # doctest: +SKIP
>>> evaluate(model, queries, EvalConfig())           # doctest: +SKIP

:func:`prepare` renders each prompt (:mod:`boxprobe.data.prompts`), tokenises the prompt and the prompt
with its gold continuation exactly as the checkpoint's own tokenizer does (``tokenizer(text)``: its
own special-token rule, no BOS added by TransformerLens; chat prompts already carry their special
tokens, so none are added to them), checks that every sequence fits the model's context, and locates
every semantic role (:mod:`boxprobe.data.positions`). Every analysis then reads the same token ids and
positions, whatever its batching.

Token indices count into ``item.ids`` = prompt ids + gold ids. Prompt roles (``query_last``, box
labels, objects, sentence ends) fall in the prompt. The answer-prefix roles fall in the teacher-forced
gold continuation; attention is causal, so the activation there equals that of a prompt to which the
prefix was appended, as Tang et al. append " the" (PootieT/entity-tracking-mi, ``--condition_on the``):

- ``answer_prefix`` (``k`` = 0): the " the" before the first gold object;
- ``answer_prefix`` (``k`` >= 1): the " the" of " ... and the" before the k-th gold object, the
  objects before it teacher-forced;
- ``answer_object``: the first token of the k-th gold object (what the model must emit next).
"""

from __future__ import annotations

import logging

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from boxprobe.data.positions import ROLES, PositionError, encode_with_offsets, frame_rows, prompt_role_rows
from boxprobe.data.prompts import FORMATS, PromptFormat, PromptTemplate, Query, build_queries, load_template
from boxprobe.data.task import Example, read_examples
from boxprobe.errors import BoxprobeError, ConfigError

ANSWER_ROLES: tuple[str, ...] = ("answer_prefix", "answer_object")
ALL_ROLES: tuple[str, ...] = ROLES + ANSWER_ROLES
DEFAULT_TEMPLATE = "default"
DEFAULT_FORMAT: PromptFormat = "per-box"


logger = logging.getLogger(__name__)

class ContextLengthError(BoxprobeError, ValueError):
    """A prompt plus its answer does not fit the model's context; ``example`` is the offending one."""

    def __init__(self, message: str, example: Example | None = None):
        super().__init__(message)
        self.example = example


class TokenizationError(BoxprobeError, ValueError):
    """The tokenizer merges a prompt with its answer, so answers cannot be read token by token."""


# -- the prompt spec --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSpec:
    """How prompts are laid out; resolved once by :func:`resolve_spec` and recorded with results."""

    template: PromptTemplate
    """Instruction, demonstrations and layout strings."""
    format: PromptFormat = DEFAULT_FORMAT
    """``per-box`` (one box per prompt) or ``all-boxes`` (every box in one statement)."""
    chat: bool = False
    """Wrap the prompt in the tokenizer's chat template, the statement opening the assistant's turn."""

    def describe(self) -> dict:
        """JSON-friendly record of the spec."""
        return {"template": self.template.name, "format": self.format, "chat": self.chat}


def checkpoint_metadata(model) -> dict:
    """The checkpoint's ``boxprobe.json`` as :func:`boxprobe.models.loading.load_model` attached it ({} if none)."""
    info = getattr(model, "boxprobe_info", None)
    return dict(info.metadata) if info is not None else {}


def resolve_spec(model=None, template: str | Path | PromptTemplate | None = None, format: str | None = None,
                 chat: bool | None = None) -> PromptSpec:
    """Each field from the arguments, else the checkpoint's ``boxprobe.json``, else the defaults.

    ``boxprobe.json`` keys: ``prompt_template`` (``template`` is read too), ``prompt_format``, ``chat``.
    The defaults: template ``default`` (2-shot, ours), ``per-box``, no chat.
    """
    meta = checkpoint_metadata(model) if model is not None else {}
    if template is None:
        template = meta.get("prompt_template") or meta.get("template") or DEFAULT_TEMPLATE
    if not isinstance(template, PromptTemplate):
        template = load_template(template)
    fmt = format or meta.get("prompt_format") or DEFAULT_FORMAT
    if fmt not in FORMATS:
        raise ConfigError(f"prompt format must be one of {', '.join(FORMATS)}; got {fmt!r}.")
    chat = bool(meta.get("chat", False)) if chat is None else chat
    return PromptSpec(template=template, format=fmt, chat=chat)


# -- the query set ----------------------------------------------------------------------------------


@dataclass
class EncodedQuery:
    """One tokenised query: prompt ids, gold continuation ids and each example's span of the gold."""

    query: Query
    prompt: list[int]
    gold: list[int]
    spans: list[tuple[int, int]]

    @property
    def ids(self) -> list[int]:
        """Prompt and gold continuation: the sequence every role's ``token_index`` counts into."""
        return self.prompt + self.gold


@dataclass(frozen=True)
class QuerySet:
    """Queries tokenised once, with every role's token positions; the input of every analysis.

    ``positions`` has one row per located role: ``item`` (index into ``items``), ``role``,
    ``token_index`` (into ``items[item].ids``), ``box``, ``object``, ``op_index``, ``mention``, ``k``
    (the answer object's rank for answer roles), ``char_start``, ``char_end`` (into prompt + continuation).
    """

    spec: PromptSpec
    items: tuple[EncodedQuery, ...]
    positions: pd.DataFrame = field(repr=False)
    tokenizer_name: str = ""
    """``name_or_path`` of the tokenizer that made the ids; analyses check the model uses the same."""
    n_ctx: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[EncodedQuery]:
        return iter(self.items)

    def __getitem__(self, index: int | slice) -> EncodedQuery | "QuerySet":
        if isinstance(index, slice):
            return self.select(range(len(self.items))[index])
        return self.items[index]

    def select(self, indices: Sequence[int]) -> "QuerySet":
        """The queries at ``indices`` (in that order), positions renumbered."""
        indices = [int(i) for i in indices]
        if any(not 0 <= i < len(self.items) for i in indices):
            raise IndexError(f"query index out of range 0..{len(self.items) - 1}")
        order = {old: new for new, old in enumerate(indices)}
        pos = self.positions[self.positions["item"].isin(order)].copy()
        pos["item"] = pos["item"].map(order).astype("int64")
        pos = pos.iloc[np.argsort(pos["item"].to_numpy(), kind="stable")].reset_index(drop=True)
        return QuerySet(self.spec, tuple(self.items[i] for i in indices), pos, self.tokenizer_name, self.n_ctx)

    @property
    def queries(self) -> list[Query]:
        return [it.query for it in self.items]

    @property
    def examples(self) -> list[Example]:
        """Every example answered, in query order (all boxes of a state for ``all-boxes``)."""
        return [ex for it in self.items for ex in it.query.examples]

    @cached_property
    def labels(self) -> pd.DataFrame:
        """Probe labels (:func:`boxprobe.data.labels.query_labels`), one row per query."""
        from boxprobe.data.labels import query_labels

        return pd.DataFrame([query_labels(it.query) for it in self.items])

    def role(self, name: str, **filters) -> pd.DataFrame:
        """Rows of ``positions`` with role ``name`` whose columns equal ``filters`` (a list means any of)."""
        if name not in ALL_ROLES:
            raise ConfigError(f"Unknown role {name!r}; roles are {', '.join(ALL_ROLES)}.")
        keep = self.positions["role"] == name
        for col, value in filters.items():
            values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
            keep &= self.positions[col].isin(values)
        return self.positions[keep]

    def single(self, name: str, **filters) -> np.ndarray:
        """The token index of a role that every query has once (e.g. ``query_last``), per query."""
        rows = self.role(name, **filters)
        if len(rows) != len(self) or not (rows["item"].to_numpy() == np.arange(len(self))).all():
            raise PositionError(f"Role {name!r} ({filters or 'no filter'}) is not located exactly once in every "
                                "query; select the queries that have it first.")
        return rows["token_index"].to_numpy()

    def check_model(self, model) -> None:
        """Raise unless ``model``'s tokenizer is the one these queries were tokenised with."""
        name = getattr(model.tokenizer, "name_or_path", "")
        if self.tokenizer_name and name and name != self.tokenizer_name:
            raise ConfigError(f"These queries were tokenised by {self.tokenizer_name!r}, not by this model's "
                              f"tokenizer {name!r}; prepare them with this model.")


# -- prepare ----------------------------------------------------------------------------------------


def _answer_rows(query: Query, offsets: np.ndarray, special: np.ndarray) -> list[tuple]:
    # Walk the continuation as prompts.build_query renders it: " ans0." or " ans0, <stmt1> ans1, ...".
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = ~special & (ends > starts)
    rows, at = [], len(query.prompt) + 1
    for n, ex in enumerate(query.examples):
        if n:
            at += len(", ") + len(ex.statement_prefix) + 1
        answer = ex.answer_text
        for k, m in enumerate(re.finditer(r"\bthe (\w+)", answer)):
            for role, (s, e) in (("answer_prefix", (m.start(), m.start() + 3)), ("answer_object", m.span(1))):
                s, e = at + s, at + e
                hit = np.flatnonzero(real & (starts < e) & (ends > s))
                if not len(hit):
                    raise PositionError(f"sample_id {ex.sample_id}: no token for {role} {k} "
                                        f"({(query.prompt + query.continuation)[s:e]!r}).")
                rows.append((role, int(hit[0]), ex.box, m.group(1), None, "", s, e, k))
        at += len(answer)
    return rows


def _spans(tokenizer, query: Query, prompt: list[int], full: list[int], chat: bool) -> list[tuple[int, int]]:
    gold = len(full) - len(prompt)
    if query.prompt_format != "all-boxes" or len(query.examples) < 2:
        return [(0, gold)]
    # Box k's span ends with the "," (or final ".") after its answer; find it by tokenising prefixes.
    ends, pos = [], len(f" {query.examples[0].answer_text}")
    for ex in query.examples[1:]:
        ends.append(pos + 1)
        pos += len(f", {ex.statement_prefix} {ex.answer_text}")
    cuts = [ids for ids, _, _ in encode_with_offsets(tokenizer, [query.prompt + query.continuation[:e] for e in ends],
                                                     add_special_tokens=not chat)]
    bounds = [0] + [len(c) - len(prompt) for c in cuts] + [gold]
    if any(c != full[: len(c)] for c in cuts) or bounds != sorted(bounds):
        raise TokenizationError(f"The tokenizer merges tokens across box boundaries in {query.continuation[:60]!r}...; "
                                "per-box verdicts are undefined there. Use the per-box format.")
    return list(zip(bounds[:-1], bounds[1:]))


def prepare(model, examples: Sequence[Example] | str | Path, spec: PromptSpec | None = None, *,
            limit: int | None = None) -> QuerySet:
    """Render, tokenise and locate every query once: the input of every analysis.

    ``examples`` is a list of :class:`~boxprobe.data.task.Example` or a JSONL path. ``spec`` defaults
    to :func:`resolve_spec` of the model. ``limit`` keeps the first N queries (an all-boxes query is one
    state). Raises :class:`ContextLengthError` before any model runs if a prompt with its answer does
    not fit the model's context.
    """
    if isinstance(examples, (str, Path)):
        examples = read_examples(examples)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 (or None for all queries), got {limit}.")
    if not examples:
        raise ConfigError("No examples to prepare queries from.")
    spec = spec or resolve_spec(model)
    tok = model.tokenizer
    if tok is None:
        raise ConfigError("The model has no tokenizer; load it with boxprobe.models.load_model.")
    queries = build_queries(examples, spec.template, spec.format, tok, spec.chat)[:limit]
    add_special = not spec.chat  # a chat template's text already holds the special tokens
    prompts = encode_with_offsets(tok, [q.prompt for q in queries], add_special_tokens=add_special)
    fulls = encode_with_offsets(tok, [q.prompt + q.continuation for q in queries], add_special_tokens=add_special)
    n_ctx = _context_length(model)
    items, rows, owners = [], [], []
    for i, (q, (p_ids, p_off, p_sp), (f_ids, f_off, f_sp)) in enumerate(zip(queries, prompts, fulls)):
        if f_ids[: len(p_ids)] != p_ids or len(f_ids) == len(p_ids):
            raise TokenizationError(f"The tokenizer {getattr(tok, 'name_or_path', '')!r} merges the prompt's last token "
                                    f"with the answer ({q.prompt[-30:]!r} + {q.continuation[:30]!r}); the answer cannot "
                                    "be read token by token. Use a template whose statement ends before a space.")
        if n_ctx is not None and len(f_ids) - 1 > n_ctx:
            ex = q.examples[0]
            raise ContextLengthError(
                f"sample_id={ex.sample_id} num_operations={ex.num_operations} box={ex.box}: the prompt and answer need "
                f"{len(f_ids) - 1} positions, more than the model's context n_ctx={n_ctx}. Use data with fewer "
                f"operations, or a template with fewer demonstrations (template {spec.template.name!r} has "
                f"{len(spec.template.demonstrations)}; 'toy' has none).", ex)
        items.append(EncodedQuery(q, list(p_ids), list(f_ids[len(p_ids):]), _spans(tok, q, p_ids, f_ids, spec.chat)))
        query_rows = [(*r, None) for r in prompt_role_rows(q, p_off, p_sp)] + _answer_rows(q, f_off, f_sp)
        rows += query_rows
        owners += [i] * len(query_rows)
    _warn_unknown(tok, queries, fulls)
    positions = frame_rows(rows, with_k=True)
    positions.insert(0, "item", np.asarray(owners, dtype=np.int64))
    return QuerySet(spec, tuple(items), positions, getattr(tok, "name_or_path", ""), n_ctx)


def _warn_unknown(tok, queries: Sequence[Query], encoded) -> None:
    """Warn, with examples, when prompts or answers hold the unknown token: words the model cannot read
    (unicode object names on a word-level vocabulary) make accuracy 0 without any other sign."""
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return
    words: dict[str, int] = {}
    n_queries = 0
    for q, (ids, offsets, _) in zip(queries, encoded):
        hits = [i for i, t in enumerate(ids) if t == unk]
        n_queries += bool(hits)
        text = q.prompt + q.continuation
        for i in hits:
            word = text[int(offsets[i][0]):int(offsets[i][1])].strip() or "?"
            words[word] = words.get(word, 0) + 1
    if words:
        top = sorted(words.items(), key=lambda kv: -kv[1])[:5]
        logger.warning("%d of %d queries hold %d unknown token(s) (%s) that the tokenizer %r maps to %r; the model "
                       "cannot read those words. Use objects in the model's vocabulary.", n_queries, len(queries),
                       sum(words.values()), ", ".join(f"{w!r} x{c}" for w, c in top),
                       getattr(tok, "name_or_path", ""), tok.unk_token)


def _context_length(model) -> int | None:
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return int(n_ctx) if n_ctx else None
